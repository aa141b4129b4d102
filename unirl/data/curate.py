"""The curate stage: render the Shapes world's six task sets into WebDataset shards.

For every task and tag, ``samples_per_tag`` samples are generated deterministically from ``seed``, checked by the
verifier (the image must satisfy its GenEval metadata; a flawed reflection image must not), assigned to splits
train/val/test **by prompt text** (stratified by the scene the prompt asks for, so each split sees every scene
family while never sharing a prompt), and written with :func:`unirl.data.shard_writer.write_shards`. The stage also
writes the tokenizer corpus, a manifest (counts per task/tag/split, shard checksums, verifier agreement) and a
preview grid.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unirl.atomic import atomic_output, atomic_write_text
from unirl.config import option
from unirl.data import tasks as task_lib
from unirl.data import verifier
from unirl.data.shard_writer import write_shards
from unirl.data.shards import write_manifest
from unirl.progress import progress_bar

SPLITS = ("train", "val", "test")


@dataclass
class CurateConfig:
    """Parameters of the ``curate`` stage (``params.yaml: curate``)."""

    out_dir: str = option("data/shards", "Root of the shard sets: <out_dir>/<task>/<split>-%06d.tar.")
    corpus_path: str = option("data/corpus.txt", "Text corpus (one line per text) for the tokenizer stage.")
    resolution: int = option(32, "Canvas side in pixels (tiny profile: 32; 64 and 256 also work).")
    seed: int = option(0, "Seed of every random draw; the same seed gives byte-identical samples.")
    tasks: list = option(list(task_lib.TASKS), "Task sets to curate (one per RL scenario).")
    samples_per_tag: dict = option(
        {"t2i": 600, "edit": 300, "t2i_cot": 300, "understand": 300, "prompt_refine": 150, "reflect": 300},
        "Samples generated per tag of each task (the dataset size knob).",
    )
    split_fractions: dict = option({"train": 0.8, "val": 0.1, "test": 0.1}, "Share of prompts per split.")
    shard_maxcount: int = option(1000, "Samples per tar shard.")
    min_verifier_agreement: float = option(
        0.99, "Fail if the verifier agrees with the ground truth on fewer than this share of images."
    )
    preview_path: str = option("data/shards/preview.png", "Preview grid of samples (PNG).")
    geneval_path: str = option(
        "data/prompts/geneval_test.jsonl", "The t2i test prompts in GenEval's evaluation_metadata.jsonl format."
    )


def _stratum(meta: dict[str, Any]) -> str:
    """What a prompt asks for, without its wording: prompts with the same stratum differ only in phrasing."""
    md = meta.get("metadata")
    if not md:
        return ""
    return json.dumps({k: v for k, v in md.items() if k != "prompt"}, sort_keys=True)


def assign_splits(prompts_by_stratum: dict[str, list[str]], fractions: dict[str, float], seed: int, salt: str):
    """Map each prompt to a split, shuffling prompts within each stratum and cutting by the fractions.

    Strata with fewer than 3 distinct prompts are pooled into one, so that every split gets prompts even when each
    prompt is unique; any pool of >= 3 prompts puts at least one in val and one in test (when their share is > 0).
    """
    total = sum(fractions.get(s, 0.0) for s in SPLITS)
    if total <= 0 or any(fractions.get(s, 0.0) < 0 for s in SPLITS):
        raise ValueError(f"split_fractions must be non-negative with a positive sum, got {fractions}")
    f = {s: fractions.get(s, 0.0) / total for s in SPLITS}
    pools: dict[str, list[str]] = {}
    for stratum, prompts in prompts_by_stratum.items():
        distinct = sorted(set(prompts))
        pools.setdefault(stratum if len(distinct) >= 3 else "\x00pooled", []).extend(distinct)
    out: dict[str, str] = {}
    for stratum, prompts in sorted(pools.items()):
        prompts = sorted(set(prompts) - set(out))
        random.Random(f"{seed}|{salt}|{stratum}").shuffle(prompts)
        n_test = max(1, round(len(prompts) * f["test"])) if f["test"] > 0 and len(prompts) >= 3 else 0
        n_val = max(1, round(len(prompts) * f["val"])) if f["val"] > 0 and len(prompts) >= 3 else 0
        for i, p in enumerate(prompts):
            out[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def _verify(sample: task_lib.Sample) -> list[bool]:
    """Verifier agreement for each image of a sample that has ground truth (True = agrees)."""
    meta, images = sample.meta, sample.images
    checks: list[tuple[Any, dict, bool]] = []
    if sample.task == "edit":
        checks = [(images["src.png"], meta["source_metadata"], True), (images["tgt.png"], meta["metadata"], True)]
    elif sample.task == "reflect":
        checks = [(images["png"], meta["metadata"], meta["verdict"] == "correct")]
        if "tgt.png" in images:
            checks.append((images["tgt.png"], meta["metadata"], True))
    elif meta.get("metadata") and "png" in images:
        checks = [(images["png"], meta["metadata"], True)]
    return [verifier.score(img, md)["correct"] == expected for img, md, expected in checks]


def curate_task(cfg: CurateConfig, task: str, progress: bool = True) -> dict[str, Any]:
    """Generate, verify, split and write one task's shard set, its manifest and its preview grid.

    Returns the task's manifest (also written to ``<out_dir>/<task>/manifest.json``).
    """
    from unirl.eval.grid import make_grid, save_image_atomic

    if task not in task_lib.TASKS:
        raise ValueError(f"unknown task {task!r}; known: {task_lib.TASKS}")
    n = int(cfg.samples_per_tag.get(task, 0))
    if n <= 0:
        raise ValueError(f"samples_per_tag[{task!r}] must be a positive integer, got {cfg.samples_per_tag.get(task)}")
    tags = task_lib.TAGS[task]
    samples: list[task_lib.Sample] = []
    agree: Counter = Counter()
    bar = progress_bar(total=n * len(tags), desc=f"curate {task}", unit="sample", disable=not progress, leave=False)
    for tag in tags:
        rng = random.Random(f"{cfg.seed}|{task}|{tag}")
        for _ in range(n):
            s = task_lib.generate(task, rng, cfg.resolution, tag=tag)
            for ok in _verify(s):
                agree[ok] += 1
            samples.append(s)
            bar.update()
    bar.close()
    checked = agree[True] + agree[False]
    agreement = agree[True] / checked if checked else 1.0
    if agreement < cfg.min_verifier_agreement:
        raise RuntimeError(
            f"verifier agreed with the ground truth on only {agreement:.3%} of {checked} {task} images "
            f"(< {cfg.min_verifier_agreement:.0%}): the renderer and the verifier disagree; "
            "run bench/verifier_accuracy.py"
        )
    strata: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        strata[f"{s.meta['tag']}|{_stratum(s.meta)}"].append(s.meta["prompt"])
    split_of = assign_splits(strata, cfg.split_fractions, cfg.seed, task)
    counters: Counter = Counter()

    def keyed():
        for s in samples:
            split = split_of[s.meta["prompt"]]
            s.meta["split"] = split
            yield f"{task}_{split}_{counters[split]:06d}", split, s
            counters[split] += 1

    manifest = write_shards(keyed(), cfg.out_dir, task, maxcount=cfg.shard_maxcount)
    manifest["verifier_agreement"] = {"checked": checked, "agreement": agreement}
    previews, captions, per_tag = [], [], Counter()
    for s in samples:
        img = s.images.get("png") or s.images.get("tgt.png")
        if img is not None and s.meta["split"] == "train" and per_tag[s.meta["tag"]] < 16 // len(tags) + 1:
            per_tag[s.meta["tag"]] += 1
            previews.append(img)
            captions.append(s.meta["prompt"])
    if previews:
        grid = make_grid(previews[:16], captions[:16])
        manifest["preview"] = str(save_image_atomic(grid, task_dir(cfg, task) / "preview.png"))
    write_manifest(task_dir(cfg, task) / "manifest.json", manifest)
    return manifest


def task_dir(cfg: CurateConfig, task: str) -> Path:
    return Path(cfg.out_dir) / task


def write_corpus(lines: list[str], path: str | os.PathLike) -> Path:
    """Write the tokenizer corpus atomically (one text per line, newlines inside a text folded to spaces)."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for line in lines:
            f.write(" ".join(line.split()) + "\n")
    return Path(path)


def finalize(cfg: CurateConfig, progress: bool = True) -> dict[str, Any]:
    """Read every task's shards back: the tokenizer corpus, the overall manifest and the preview grid."""
    from unirl.data.shards import read_samples
    from unirl.eval.grid import make_grid, save_image_atomic

    manifest: dict[str, Any] = {"resolution": cfg.resolution, "seed": cfg.seed, "tasks": {}}
    lines: list[str] = []
    previews, captions = [], []
    for task in progress_bar(cfg.tasks, desc="corpus", unit="task", disable=not progress):
        path = task_dir(cfg, task) / "manifest.json"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: curate task {task!r} first (`unirl curate --task {task}`)")
        manifest["tasks"][task] = json.loads(path.read_text())
        for split in SPLITS:
            if not manifest["tasks"][task]["splits"].get(split):
                continue
            for k, s in enumerate(read_samples(task_dir(cfg, task), split)):
                lines.extend(task_lib.corpus_lines(s))
                img = s.images.get("png") or s.images.get("tgt.png")
                if split == "train" and k < 4 and img is not None:
                    previews.append(img)
                    captions.append(f"[{task}] {s.meta['prompt']}")
    manifest["corpus"] = {"path": str(write_corpus(lines, cfg.corpus_path)), "lines": len(lines)}
    manifest["preview"] = str(save_image_atomic(make_grid(previews, captions, cols=8), cfg.preview_path))
    write_manifest(Path(cfg.out_dir) / "manifest.json", manifest)
    return manifest


def export_geneval_metadata(cfg: CurateConfig, split: str = "test") -> tuple[Path, dict[str, int]]:
    """Write the t2i ``split`` prompts' metadata as GenEval's JSONL (one object per line, each prompt once)."""
    from unirl.data.shards import read_samples

    seen: dict[str, dict] = {}
    for s in read_samples(task_dir(cfg, "t2i"), split, decode=False):
        md = s.meta["metadata"]
        seen.setdefault(md["prompt"], md)
    path = atomic_write_text(cfg.geneval_path, "".join(json.dumps(md) + "\n" for md in seen.values()))
    return path, dict(Counter(md["tag"] for md in seen.values()))


def curate(cfg: CurateConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole stage: every task's shards, then :func:`finalize` and the GenEval prompt file."""
    for task in progress_bar(cfg.tasks, desc="curate", unit="task", disable=not progress):
        curate_task(cfg, task, progress=progress)
    manifest = finalize(cfg, progress=progress)
    if "t2i" in cfg.tasks:
        export_geneval_metadata(cfg)
    return manifest


def run_cli(cfg: CurateConfig, tasks: list[str] | None = None) -> dict[str, Any]:
    """``unirl curate``: all tasks (then the corpus and manifest), or only ``tasks``; returns a short summary."""
    if tasks:
        return {t: curate_task(cfg, t)["splits"] for t in tasks}
    manifest = curate(cfg)
    return {t: m["splits"] for t, m in manifest["tasks"].items()} | {"corpus_lines": manifest["corpus"]["lines"]}


def import_datasets(
    cfg: CurateConfig, captions: list[str] | None = None, edits: list[str] | None = None, name: str = "imported"
) -> dict[str, Any]:
    """Import real datasets on disk into the shard schema: ``<out_dir>/<name>_t2i`` and ``<out_dir>/<name>_edit``.

    ``captions``: image-caption WebDataset tars (or folders of them); ``edits``: editing parquet files. Splits are
    assigned by prompt (caption / instruction) exactly as for the Shapes world. Nothing is fetched from a hub.
    """
    from unirl.data.importers import import_caption_tars, import_edit_parquet

    out: dict[str, Any] = {}
    for kind, paths, reader in (("t2i", captions, import_caption_tars), ("edit", edits, import_edit_parquet)):
        if not paths:
            continue
        records = list(progress_bar(reader(paths, cfg.resolution), desc=f"import {kind}", unit="sample"))
        split_of = assign_splits({"": [r.meta["prompt"] for r in records]}, cfg.split_fractions, cfg.seed, name)
        counters: Counter = Counter()

        def keyed(records=records, split_of=split_of, counters=counters):
            for r in records:
                split = r.meta["split"] = split_of[r.meta["prompt"]]
                yield f"{name}_{split}_{counters[split]:06d}", split, r
                counters[split] += 1

        out[f"{name}_{kind}"] = write_shards(keyed(), cfg.out_dir, f"{name}_{kind}", maxcount=cfg.shard_maxcount)
        write_manifest(Path(cfg.out_dir) / f"{name}_{kind}" / "manifest.json", out[f"{name}_{kind}"])
    if not out:
        raise ValueError("nothing to import: pass --captions PATH... and/or --edits PATH...")
    return out


def run_import(cfg: CurateConfig, captions: list[str] | None = None, edits: list[str] | None = None,
               name: str = "imported") -> dict[str, Any]:
    """``unirl import-data``: import and return the split counts per imported set."""
    return {k: m["splits"] for k, m in import_datasets(cfg, captions, edits, name).items()}
