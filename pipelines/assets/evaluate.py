"""Evaluation assets: one per benchmark over every checkpoint, the results table, and gated registry promotion."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg

from pipelines.resources import UnirlParams, image_md
from unirl.cli import SCENARIOS
from unirl.eval.benchmarks import BENCHMARKS
from unirl.eval.report import EvalConfig, assemble_results, run_benchmark
from unirl.promotion import PromoteConfig, run_promote, validate_results

CHECKPOINT_ASSETS = ["sft_model", *(f"rl_{s}" for s in SCENARIOS)]


def _benchmark_asset(name: str) -> dg.AssetsDefinition:
    @dg.asset(name=f"bench_{name}", group_name="eval", deps=CHECKPOINT_ASSETS, kinds={"json"},
              description=f"The `{name}` benchmark on every checkpoint (fixed held-out prompts and seeds).")
    def _bench(unirl: UnirlParams) -> dg.MaterializeResult:
        cfg = unirl.config(EvalConfig, "eval")
        result = run_benchmark(cfg, name, progress=False)
        meta: dict[str, object] = {
            "metrics": dg.MetadataValue.json(result["metrics"]),
            "settings": dg.MetadataValue.json(result["settings"]),
            "skipped": dg.MetadataValue.json(result["skipped"]),
        }
        grid = result.get("grid")
        if grid and Path(grid).exists():
            meta["samples"] = image_md(grid, f"{name} side by side")
        return dg.MaterializeResult(metadata=meta)

    return _bench


BENCHMARK_ASSETS = [_benchmark_asset(b) for b in BENCHMARKS]


@dg.asset(group_name="eval", deps=[a.key for a in BENCHMARK_ASSETS], kinds={"json", "mlflow"},
          description="results.json and the results table (one row per checkpoint, one column per benchmark).")
def eval_results(unirl: UnirlParams) -> dg.MaterializeResult:
    cfg = unirl.config(EvalConfig, "eval")
    results = assemble_results(cfg)
    table = Path(cfg.out_dir, "table.md")
    meta: dict[str, object] = {
        "path": dg.MetadataValue.path(str(Path(cfg.out_dir) / "results.json")),
        "headline": dg.MetadataValue.json(results["headline"]),
    }
    if table.exists():
        meta["table"] = dg.MetadataValue.md(table.read_text())
    if results.get("mlflow_run"):
        meta["mlflow_run"] = dg.MetadataValue.url(results["mlflow_run"])
    return dg.MaterializeResult(metadata=meta)


@dg.asset_check(asset=eval_results, blocking=True, description="results.json is complete enough to promote from")
def results_promotable(unirl: UnirlParams) -> dg.AssetCheckResult:
    cfg = unirl.config(PromoteConfig, "promote")
    path = Path(cfg.results_path)
    problems = ["missing " + str(path)] if not path.exists() else validate_results(json.loads(path.read_text()))
    return dg.AssetCheckResult(passed=not problems, metadata={"problems": dg.MetadataValue.json(problems)})


@dg.asset(group_name="eval", deps=[eval_results], kinds={"mlflow"},
          description="Every evaluated checkpoint registered; `champion` moves on a better headline, no regression.")
def registered_model(unirl: UnirlParams) -> dg.MaterializeResult:
    cfg = unirl.config(PromoteConfig, "promote")
    decision = run_promote(cfg)
    return dg.MaterializeResult(metadata={"decision": dg.MetadataValue.json(decision),
                                          "registered_model": cfg.registered_model})
