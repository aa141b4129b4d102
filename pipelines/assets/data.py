"""Data assets: one shard set per task, the tokenizer corpus, GenEval-format test prompts, and their GX checks."""

from __future__ import annotations

import dagster as dg

from pipelines.resources import UnirlParams, image_md
from unirl.data import curate as curate_lib
from unirl.data import tasks as task_lib
from unirl.data import validation_stage


def _shard_asset(task: str) -> dg.AssetsDefinition:
    @dg.asset(
        name=f"shards_{task}",
        group_name="data",
        kinds={"webdataset"},
        description=f"WebDataset shards of the `{task}` task (train/val/test, disjoint by prompt), verified.",
    )
    def _shards(unirl: UnirlParams) -> dg.MaterializeResult:
        cfg = unirl.config(curate_lib.CurateConfig, "curate")
        manifest = curate_lib.curate_task(cfg, task, progress=False)
        meta = {
            "path": dg.MetadataValue.path(str(curate_lib.task_dir(cfg, task))),
            "dagster/row_count": sum(manifest["splits"].values()),
            "splits": dg.MetadataValue.json(manifest["splits"]),
            "tags": dg.MetadataValue.json(manifest["tags"]),
            "verifier_agreement": manifest["verifier_agreement"]["agreement"],
            "shards": dg.MetadataValue.json(manifest["shards"]),
        }
        if manifest.get("preview"):
            meta["preview"] = image_md(manifest["preview"], f"{task} samples")
        return dg.MaterializeResult(metadata=meta)

    return _shards


def _gx_check(task: str) -> dg.AssetChecksDefinition:
    @dg.asset_check(asset=f"shards_{task}", name="gx_suite", blocking=True, description="Great Expectations suite")
    def _check(unirl: UnirlParams) -> dg.AssetCheckResult:
        cfg = unirl.config(validation_stage.ValidateConfig, "validate")
        report = validation_stage.validate_task(cfg, task)
        return dg.AssetCheckResult(
            passed=bool(report.success),
            metadata={"summary": dg.MetadataValue.md(report.summary), "failed": dg.MetadataValue.json(report.failed)},
        )

    return _check


SHARD_ASSETS = [_shard_asset(t) for t in task_lib.TASKS]
GX_CHECKS = [_gx_check(t) for t in task_lib.TASKS]


@dg.asset(
    group_name="data",
    deps=[a.key for a in SHARD_ASSETS],
    kinds={"text"},
    description="Every text of every task (prompts, traces, instructions, Q&A) for the tokenizer; plus the manifest.",
)
def tokenizer_corpus(unirl: UnirlParams) -> dg.MaterializeResult:
    cfg = unirl.config(curate_lib.CurateConfig, "curate")
    manifest = curate_lib.finalize(cfg, progress=False)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(manifest["corpus"]["path"]),
            "lines": manifest["corpus"]["lines"],
            "manifest": dg.MetadataValue.json({t: m["splits"] for t, m in manifest["tasks"].items()}),
            "preview": image_md(manifest["preview"], "samples of every task"),
        }
    )


@dg.asset(
    group_name="data",
    deps=["shards_t2i"],
    kinds={"json"},
    description="The t2i test prompts as GenEval's evaluation_metadata.jsonl (read by the GenEval benchmark runner).",
)
def geneval_prompts(unirl: UnirlParams) -> dg.MaterializeResult:
    cfg = unirl.config(curate_lib.CurateConfig, "curate")
    path, counts = curate_lib.export_geneval_metadata(cfg)
    return dg.MaterializeResult(
        metadata={"path": dg.MetadataValue.path(str(path)), "per_tag": dg.MetadataValue.json(counts)}
    )
