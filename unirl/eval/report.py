"""The eval stage: every benchmark on every checkpoint, then ``results.json``, tables, grids and one MLflow run.

``run_eval(cfg)`` = :func:`run_benchmark` for each benchmark (each checkpoint directory that exists is loaded,
evaluated on the same prompts with the same seeds, and its first samples go into a side-by-side grid; a missing
directory is skipped with a warning, so the stage works when only SFT exists) + :func:`assemble_results`, which
writes under ``out_dir``:

- ``results.json``: ``{"checkpoints": {name: {metric: value}}, "headline": {scenario: metric}, "settings": {...},
  "skipped": {name: path}, "timing_s": {...}, "mlflow_run": url}``;
- ``table.md`` / ``table.json``: one row per checkpoint, one column per benchmark metric (:data:`TABLE_COLUMNS`);
- ``metrics.json``: flat ``{"<checkpoint>/<metric>": value}`` (DVC ``metrics``); ``plots/<metric>.json``:
  ``[{"checkpoint", "value"}]`` per table column (DVC ``plots``, x = checkpoint, y = value);
- ``grids/<benchmark>.png`` (rows: inputs where there are any, then one row per checkpoint); ``geneval/<name>/``:
  the GenEval images in GenEval's folder layout (re-scorable with ``unirl eval geneval --images``);
- ``benchmarks/<benchmark>.json``: each benchmark's own output (what one Dagster asset per benchmark produces).

Everything is also logged to one MLflow run (params = settings, metrics ``<checkpoint>/<metric>``, the files above
as artifacts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from unirl.atomic import atomic_write_json, atomic_write_text, staged_dir
from unirl.config import option, to_dict
from unirl.data.shards import read_samples
from unirl.data.verifier import load_geneval_metadata
from unirl.eval.benchmarks import BENCHMARKS, IMAGE_BENCHMARKS, BenchmarkResult, Sampling, select_balanced
from unirl.eval.geneval import load_detector, write_geneval_folder
from unirl.eval.grid import make_grid, save_image_atomic

log = logging.getLogger(__name__)

__all__ = ["HEADLINE", "TABLE_COLUMNS", "EvalConfig", "assemble_results", "run_benchmark", "run_eval"]

SCENARIOS: tuple[str, ...] = ("t2i", "edit", "t2i_cot", "understand", "prompt_refine", "reflect")
HEADLINE: dict[str, str] = {
    "t2i": "geneval/overall",
    "edit": "edit/correct",
    "t2i_cot": "cot/with_reasoning",
    "understand": "vqa/accuracy",
    "prompt_refine": "refine/score",
    "reflect": "reflect/judgement",
}
# The results table's columns: one per benchmark number (the headline metrics and their companions).
TABLE_COLUMNS: tuple[str, ...] = (
    "geneval/overall", "geneval_score/overall", "edit/correct", "edit/score", "edit/preservation",
    "cot/with_reasoning", "cot/without_reasoning", "vqa/accuracy", "reflect/judgement", "reflect/score_before",
    "reflect/score_after", "refine/score", "refine/raw_score",
)  # fmt: skip


@dataclasses.dataclass
class EvalConfig:
    """Parameters of the ``eval`` stage (``params.yaml: eval``)."""

    # --- what to evaluate
    checkpoints: dict = option(
        {"sft": "data/models/sft"} | {f"rl_{s}": f"data/models/rl_{s}" for s in SCENARIOS},
        "Checkpoints to evaluate, {name: save_pretrained directory}; missing directories are skipped with a warning.",
    )
    benchmarks: list = option(list(BENCHMARKS), f"Benchmarks to run, among {list(BENCHMARKS)}.")
    headline: dict = option(dict(HEADLINE), "Scenario -> the metric its RL stage must raise (used by promotion).")
    # --- data
    shards_dir: str = option("data/shards", "Root of the shard sets (<shards_dir>/<task>/<split>-*.tar).")
    split: str = option("test", "Held-out split the prompts come from.")
    geneval_metadata: str = option(
        "data/prompts/geneval_test.jsonl",
        "GenEval-format metadata (evaluation_metadata.jsonl) for the geneval benchmark; if missing, the t2i "
        "shards' metadata of `split` are used.",
    )
    n_prompts: dict = option(
        {"geneval": 96, "edit": 60, "cot": 48, "vqa": 120, "reflect": 48, "refine": 48},
        "Prompts per benchmark, taken round-robin over tags (sorted tag names, file order within a tag).",
    )
    images_per_prompt: int = option(2, f"Images per prompt (and arm) of the image benchmarks {list(IMAGE_BENCHMARKS)}"
                                       " (GenEval itself uses 4); their metrics average every image.")
    # --- sampling (null = the checkpoint's own config.sampling value)
    steps: int | None = option(10, "Euler steps per image (null: the checkpoint's default).")
    cfg_scale: float | None = option(None, "Text guidance scale (null: the checkpoint's default).")
    ref_cfg_scale: float | None = option(None, "Reference-image guidance scale for editing (null: default).")
    seed: int = option(0, "Base seed; sample i of a benchmark uses seed * 1000003 + i.")
    max_new_tokens: int = option(64, "Greedy decoding budget of the LM per completion.")
    batch_size: int = option(16, "Samples per forward batch (does not change any result).")
    lm_templates: dict = option({}, "Task -> user-turn template over the sample meta (e.g. '{prompt}'); default: "
                                    "the meta prompt as is, as SFT and RL feed it.")
    detector: str | None = option(None, "'module:attr' of a Detector for the judge (null: the Shapes detector).")
    num_threads: int = option(0, "torch intra-op threads (0: leave torch's default).")
    # --- outputs
    out_dir: str = option("data/eval", "Output directory (results.json, tables, metrics, plots, grids).")
    preview_prompts: int = option(6, "Prompts per benchmark shown in the side-by-side grids.")
    save_geneval_images: bool = option(True, "Write the GenEval images in GenEval's folder layout.")
    tracking: bool = option(True, "Log the run to MLflow.")
    experiment: str = option("eval", "MLflow experiment name.")
    dvc_lock: str = option("dvc.lock", "dvc.lock whose hash of shards_dir is recorded as the data version.")


def existing_checkpoints(cfg: EvalConfig) -> tuple[dict[str, Path], dict[str, str]]:
    """(name -> directory for those that exist, name -> path for those skipped with a warning)."""
    found, skipped = {}, {}
    for name, path in cfg.checkpoints.items():
        p = Path(path)
        if p.is_dir():
            found[name] = p
        else:
            skipped[name] = str(path)
            log.warning("eval: checkpoint %r skipped, directory %s does not exist (its stage has not run)", name, p)
    return found, skipped


def load_inputs(cfg: EvalConfig, benchmark: str) -> list[Any]:
    """The benchmark's fixed prompts: GenEval metadata records, or shard samples of ``cfg.split``."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {list(BENCHMARKS)}")
    n = int(cfg.n_prompts.get(benchmark, 0))
    if n <= 0:
        raise ValueError(f"eval.n_prompts[{benchmark!r}] must be a positive integer, got "
                         f"{cfg.n_prompts.get(benchmark)!r}")
    task = BENCHMARKS[benchmark][1]
    if benchmark == "geneval":
        path = Path(cfg.geneval_metadata)
        if path.is_file():
            records = load_geneval_metadata(path)
        else:
            log.warning("eval: %s not found, using the %s shards' metadata of split %r", path, task, cfg.split)
            seen: dict[str, dict] = {}
            for s in read_samples(Path(cfg.shards_dir) / task, cfg.split, decode=False):
                seen.setdefault(s.meta["metadata"]["prompt"], s.meta["metadata"])
            records = list(seen.values())
        items = select_balanced(records, n, tag=lambda md: md["tag"])
    else:
        items = select_balanced(list(read_samples(Path(cfg.shards_dir) / task, cfg.split)), n,
                                tag=lambda s: s.meta["tag"])
    if not items:
        raise ValueError(f"no {cfg.split} prompts for benchmark {benchmark!r} (task {task!r} under {cfg.shards_dir}); "
                         "run `unirl curate` first")
    return items


def _input_row(benchmark: str, items: list[Any], n: int) -> list[tuple[Any, str]]:
    if benchmark == "edit":
        return [(s.images["src.png"], f"source | {s.meta['prompt']}") for s in items[:n]]
    if benchmark == "reflect":
        return [(s.images["png"], f"judged ({s.meta['verdict']}) | {s.meta['prompt']}") for s in items[:n]]
    return []


def side_by_side(rows: list[list[tuple[Any, str]]]) -> Any | None:
    """One grid row per entry of ``rows`` (inputs, then each checkpoint); short rows are padded with blanks."""
    from PIL import Image

    width = max((len(r) for r in rows), default=0)
    if width == 0:
        return None
    size = next(im.size for r in rows for im, _ in r)
    blank = (Image.new("RGB", size, (250, 250, 250)), "")
    cells = [cell for r in rows for cell in list(r) + [blank] * (width - len(r))]
    return make_grid([im for im, _ in cells], [c for _, c in cells], cols=width)


def run_benchmark(cfg: EvalConfig, benchmark: str, progress: bool = True) -> dict[str, Any]:
    """Evaluate every existing checkpoint on one benchmark; writes ``benchmarks/<name>.json`` and its grid."""
    from unirl.models.unified import UnifiedModel
    from unirl.progress import progress_bar

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    fn, _ = BENCHMARKS[benchmark]
    ckpts, skipped = existing_checkpoints(cfg)
    if not ckpts:
        raise FileNotFoundError(f"none of the eval checkpoints exists ({cfg.checkpoints}); train SFT first "
                                "(unirl sft / dvc repro sft) or fix eval.checkpoints in params.yaml")
    out = Path(cfg.out_dir)
    items = load_inputs(cfg, benchmark)
    detector = load_detector(cfg.detector)
    kwargs: dict[str, Any] = {"preview_n": cfg.preview_prompts, "templates": cfg.lm_templates}
    if benchmark in IMAGE_BENCHMARKS:
        kwargs["images_per_prompt"] = cfg.images_per_prompt
    result: dict[str, Any] = {"benchmark": benchmark, "n_prompts": len(items), "metrics": {}, "settings": {},
                              "timing_s": {}, "skipped": skipped, "records": {}}
    rows: list[list[tuple[Any, str]]] = [r for r in [_input_row(benchmark, items, cfg.preview_prompts)] if r]
    for name, path in progress_bar(ckpts.items(), desc=f"eval {benchmark}", unit="ckpt", disable=not progress):
        t0 = time.perf_counter()
        model = UnifiedModel.from_pretrained(path).eval()
        sampling = Sampling.for_model(model, cfg.steps, cfg.cfg_scale, cfg.ref_cfg_scale, cfg.seed,
                                      cfg.max_new_tokens, cfg.batch_size)
        res: BenchmarkResult = fn(model, items, sampling, detector, **kwargs)
        result["metrics"][name] = res.metrics
        result["settings"][name] = sampling.record() | {"path": str(path)}
        result["records"][name] = res.records
        if res.images is not None and cfg.save_geneval_images:
            with staged_dir(out / "geneval" / name) as tmp:  # no stale images from an earlier, larger run
                write_geneval_folder(tmp, items, res.images)
        with_prompt = not rows  # the first row names the prompts
        rows.append([(im, f"{name} {outcome}" + (f" | {prompt}" if with_prompt else "")) for im, outcome, prompt
                     in res.previews])
        result["timing_s"][name] = round(time.perf_counter() - t0, 2)
        log.info("eval %s %s: %s (%.1fs)", benchmark, name, res.metrics, result["timing_s"][name])
        del model
    grid = side_by_side(rows)
    if grid is not None:
        result["grid"] = str(save_image_atomic(grid, out / "grids" / f"{benchmark}.png"))
    atomic_write_json(out / "benchmarks" / f"{benchmark}.json", result)
    return result


def _table(checkpoints: dict[str, dict[str, float]]) -> tuple[list[str], str, dict[str, Any]]:
    present = {m for metrics in checkpoints.values() for m in metrics}
    columns = [c for c in TABLE_COLUMNS if c in present]
    rows = [{"checkpoint": name} | {c: metrics.get(c) for c in columns} for name, metrics in checkpoints.items()]
    md = ["| checkpoint | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in rows:
        cells = ["–" if row[c] is None else f"{row[c]:.3f}" for c in columns]
        md.append(f"| {row['checkpoint']} | " + " | ".join(cells) + " |")
    return columns, "\n".join(md) + "\n", {"columns": ["checkpoint", *columns], "rows": rows}


def assemble_results(cfg: EvalConfig, tracker: Any | None = None) -> dict[str, Any]:
    """Merge ``benchmarks/*.json`` of ``cfg.benchmarks`` into ``results.json``, the tables, metrics and plots."""
    from unirl.tracking import data_version, flatten_params, make_tracker

    out = Path(cfg.out_dir)
    checkpoints: dict[str, dict[str, float]] = {}
    settings: dict[str, Any] = {"config": to_dict(cfg), "benchmarks": {}, "data_version": None}
    timing: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    for bench in cfg.benchmarks:
        path = out / "benchmarks" / f"{bench}.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the {bench!r} benchmark first (run_benchmark)")
        part = json.loads(path.read_text())
        for name, metrics in part["metrics"].items():
            checkpoints.setdefault(name, {}).update(metrics)
        settings["benchmarks"][bench] = {"n_prompts": part["n_prompts"], "sampling": part["settings"]}
        timing[bench] = part["timing_s"]
        skipped.update(part["skipped"])
    rank = {name: i for i, name in enumerate(cfg.checkpoints)}
    checkpoints = dict(sorted(checkpoints.items(), key=lambda kv: rank.get(kv[0], len(rank))))
    settings["data_version"] = data_version(cfg.dvc_lock, cfg.shards_dir.rstrip("/"))
    settings["detector"] = cfg.detector or "unirl.data.verifier:ShapesDetector"
    columns, md, table = _table(checkpoints)
    paths = {name: str(cfg.checkpoints.get(name, "")) for name in checkpoints}
    results: dict[str, Any] = {"checkpoints": checkpoints, "headline": dict(cfg.headline), "settings": settings,
                               "paths": paths, "skipped": skipped, "timing_s": timing, "columns": columns}
    flat = {f"{name}/{m}": v for name, metrics in checkpoints.items() for m, v in metrics.items()}
    atomic_write_json(out / "metrics.json", flat, sort_keys=False)

    with staged_dir(out / "plots") as folder:  # no plot files of columns an earlier run had
        for c in columns:
            plot = [{"checkpoint": name, "value": m[c]} for name, m in checkpoints.items() if c in m]
            atomic_write_json(folder / f"{c.replace('/', '__')}.json", plot, sort_keys=False)
    atomic_write_text(out / "table.md", md)
    atomic_write_json(out / "table.json", table, sort_keys=False)

    own = tracker is None
    tracker = tracker or make_tracker(cfg.experiment, enabled=cfg.tracking, is_main=True)
    if own:
        tracker.start("eval", params=flatten_params({"eval": to_dict(cfg)}), tags={"stage": "eval"})
    try:
        tracker.log_metrics(flat, step=0)
        results["mlflow_run"] = tracker.run_url()
        atomic_write_json(out / "results.json", results, sort_keys=False)
        for name in ("results.json", "table.md", "table.json", "metrics.json"):
            tracker.log_artifact(out / name)
        for sub in ("grids", "benchmarks"):
            if (out / sub).is_dir():
                tracker.log_artifact(out / sub, sub)
    except BaseException:
        if own:
            tracker.finish("FAILED")
        raise
    if own:
        tracker.finish()
    return results


def run_eval(cfg: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """The whole stage: every benchmark in ``cfg.benchmarks``, then :func:`assemble_results`; returns results."""
    unknown = sorted(set(cfg.benchmarks) - set(BENCHMARKS))
    if unknown:
        raise ValueError(f"eval.benchmarks has unknown name(s) {unknown}; known: {list(BENCHMARKS)}")
    for bench in cfg.benchmarks:
        run_benchmark(cfg, bench, progress=progress)
    return assemble_results(cfg)


def run_cli(cfg: EvalConfig) -> dict[str, Any]:
    """``unirl eval``: run the stage and return a short summary (the table rows and where the files are)."""
    results = run_eval(cfg)
    print(Path(cfg.out_dir, "table.md").read_text(), flush=True)
    return {"results": str(Path(cfg.out_dir) / "results.json"), "checkpoints": sorted(results["checkpoints"]),
            "skipped": sorted(results["skipped"]), "mlflow_run": results.get("mlflow_run")}
