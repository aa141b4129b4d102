"""The GenEval protocol: its folder layout, its per-image records and its summary, with a pluggable detector.

GenEval (djghosh13/geneval) evaluates a folder written by its generation script::

    <outdir>/<index:05d>/metadata.jsonl    one JSON object: the prompt's metadata (GenEval schema)
    <outdir>/<index:05d>/samples/<k:05d>.png

``evaluate_images.py`` scores every ``samples/<digits>.png`` of every all-digit subfolder against that metadata
(one record per image: ``tag``, ``prompt``, ``correct``, ``reason``) and ``summary_scores.py`` reports, from those
records, the share of correct images and of prompts with at least one correct image, the per-tag accuracy (mean
``correct`` over the tag's images) and the overall score = the mean of the per-tag accuracies. This module does the
same with :func:`unirl.data.verifier.score` as the judge (the Shapes detector by default, or any
:class:`~unirl.data.verifier.Detector` given as ``"module:attr"``), and adds the verifier's partial score per tag.

``unirl eval geneval --images DIR [--detector module:attr] [--out results.jsonl]`` prints the summary and, as its
last line, one JSON object ``{"overall": ..., "<tag>": ...}`` (binary correct, as GenEval).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from unirl.atomic import atomic_write_text
from unirl.data.shapes import SHAPES
from unirl.data.verifier import DEFAULT_DETECTOR, Detector, score, validate_metadata

__all__ = [
    "detector_classes",
    "format_summary",
    "load_detector",
    "main",
    "score_geneval_folder",
    "score_records",
    "summarize",
    "write_geneval_folder",
]

_DIGITS = re.compile(r"^\d+$")
_SAMPLE = re.compile(r"^\d+\.png$")


def load_detector(spec: str | None) -> Detector:
    """``None`` -> the Shapes detector; ``"module:attr"`` -> that object (a class is instantiated without args)."""
    if spec is None or spec in ("", "shapes"):
        return DEFAULT_DETECTOR
    from unirl.tracking import import_string

    obj = import_string(spec)
    if isinstance(obj, type):
        obj = obj()
    if not callable(obj):
        raise TypeError(f"detector {spec!r} is not callable: it must map a PIL image to a list of Detection")
    return obj


def detector_classes(detector: Detector) -> Collection[str] | None:
    """The detector's vocabulary: its ``classes`` attribute, the Shapes classes for the default, else None (any)."""
    classes = getattr(detector, "classes", None)
    if classes is not None:
        return tuple(classes)
    return SHAPES if detector is DEFAULT_DETECTOR else None


def score_records(
    images: Sequence[Image.Image], metadatas: Sequence[Mapping[str, Any]], detector: Detector | None = None
) -> list[dict[str, Any]]:
    """One GenEval record per image: ``tag``, ``prompt``, ``correct``, ``score`` (partial), ``reason``,
    ``metadata`` (the JSON text, as GenEval's results.jsonl)."""
    if len(images) != len(metadatas):
        raise ValueError(f"score_records got {len(images)} images but {len(metadatas)} metadata records")
    det = detector or DEFAULT_DETECTOR
    classes = detector_classes(det)
    out = []
    for image, md in zip(images, metadatas):
        r = score(image, dict(md), det, classes)
        out.append({"tag": md["tag"], "prompt": md["prompt"], "correct": bool(r["correct"]),
                    "score": float(r["score"]), "reason": r["reason"], "metadata": json.dumps(md, sort_keys=True)})
    return out


def summarize(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """GenEval's summary of per-image records (keys ``tag``, ``correct``, ``metadata``; ``score`` optional).

    Returns ``{"images", "prompts", "correct_images", "correct_prompts", "tags": {tag: {"correct", "n_correct",
    "n", "score"}}, "overall", "overall_score"}``; tags keep their first-seen order (GenEval groups with
    ``sort=False``); ``overall`` is the mean of the per-tag accuracies, ``overall_score`` that of the partial scores.
    """
    records = list(records)
    if not records:
        raise ValueError("no GenEval records to summarise (no images were scored)")
    by_tag: dict[str, list[Mapping[str, Any]]] = {}
    by_prompt: dict[str, bool] = {}
    for r in records:
        by_tag.setdefault(r["tag"], []).append(r)
        key = r.get("metadata") or r.get("prompt")
        by_prompt[key] = by_prompt.get(key, False) or bool(r["correct"])
    tags = {}
    for tag, rs in by_tag.items():
        n_correct = sum(bool(r["correct"]) for r in rs)
        scored = [float(r["score"]) for r in rs if r.get("score") is not None]
        tags[tag] = {"correct": n_correct / len(rs), "n_correct": n_correct, "n": len(rs),
                     "score": sum(scored) / len(scored) if scored else None}
    tag_scores = [t["score"] for t in tags.values() if t["score"] is not None]
    return {
        "images": len(records),
        "prompts": len(by_prompt),
        "correct_images": sum(bool(r["correct"]) for r in records) / len(records),
        "correct_prompts": sum(by_prompt.values()) / len(by_prompt),
        "tags": tags,
        "overall": sum(t["correct"] for t in tags.values()) / len(tags),
        "overall_score": sum(tag_scores) / len(tag_scores) if len(tag_scores) == len(tags) else None,
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    """The text GenEval's ``summary_scores.py`` prints (plus the partial score per tag)."""
    lines = ["Summary", "=======", f"Total images: {summary['images']}", f"Total prompts: {summary['prompts']}",
             f"% correct images: {summary['correct_images']:.2%}",
             f"% correct prompts: {summary['correct_prompts']:.2%}", "", "Task breakdown", "=============="]
    for tag, t in summary["tags"].items():
        partial = f"  partial score {t['score']:.4f}" if t["score"] is not None else ""
        lines.append(f"{tag:<16} = {t['correct']:.2%} ({t['n_correct']} / {t['n']}){partial}")
    lines += ["", f"Overall score (avg. over tasks): {summary['overall']:.5f}"]
    return "\n".join(lines)


def write_geneval_folder(
    out_dir: str | os.PathLike, metadatas: Sequence[Mapping[str, Any]], images: Sequence[Sequence[Image.Image]]
) -> Path:
    """Write ``images[i]`` (the samples of prompt i) in GenEval's layout; each PNG via a temp file + rename."""
    from unirl.eval.grid import save_image_atomic

    if len(metadatas) != len(images):
        raise ValueError(f"write_geneval_folder got {len(metadatas)} metadata records but {len(images)} image lists")
    out = Path(out_dir)
    for i, (md, samples) in enumerate(zip(metadatas, images)):
        folder = out / f"{i:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "metadata.jsonl", json.dumps(dict(md)) + "\n")  # one line, as GenEval writes
        for k, im in enumerate(samples):
            save_image_atomic(im, folder / "samples" / f"{k:05d}.png")
    return out


def _read_folder(path: Path) -> tuple[list[Image.Image], list[dict]]:
    if not path.is_dir():
        raise FileNotFoundError(f"GenEval image folder {path} does not exist")
    images, metadatas = [], []
    subfolders = sorted(p for p in path.iterdir() if p.is_dir() and _DIGITS.match(p.name))
    if not subfolders:
        raise FileNotFoundError(f"{path} has no <index:05d>/ subfolders: it is not a GenEval image folder "
                                "(<index:05d>/metadata.jsonl + <index:05d>/samples/*.png)")
    for sub in subfolders:
        md_file = sub / "metadata.jsonl"
        if not md_file.is_file():
            raise FileNotFoundError(f"{md_file} is missing: every prompt folder needs its metadata.jsonl")
        try:
            md = validate_metadata(json.loads(md_file.read_text(encoding="utf-8")), where=str(md_file))
        except json.JSONDecodeError as e:
            raise ValueError(f"{md_file} is not one JSON object ({e.msg}); GenEval writes one per prompt") from e
        sample_dir = sub / "samples"
        names = sorted(p.name for p in sample_dir.iterdir() if _SAMPLE.match(p.name)) if sample_dir.is_dir() else []
        for name in names:
            with Image.open(sample_dir / name) as im:
                images.append(im.convert("RGB"))
            metadatas.append(md)
    if not images:
        raise FileNotFoundError(f"no samples/<digits>.png images under {path}")
    return images, metadatas


def score_geneval_folder(
    path: str | os.PathLike, detector: Detector | str | None = None, out: str | os.PathLike | None = None
) -> dict[str, Any]:
    """Score a GenEval image folder; returns :func:`summarize`'s dict plus ``records`` (one per image).

    ``out`` writes the records as JSON lines (GenEval's ``results.jsonl``), atomically.
    """
    det = load_detector(detector) if detector is None or isinstance(detector, str) else detector
    images, metadatas = _read_folder(Path(path))
    records = score_records(images, metadatas, det)
    if out is not None:
        atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in records))
    return summarize(records) | {"records": records}


def main(argv: Sequence[str] | None = None) -> int:
    """``unirl eval geneval --images DIR [--detector module:attr] [--out FILE]``; last line: one JSON object."""
    parser = argparse.ArgumentParser(prog="unirl eval geneval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", required=True, help="folder in GenEval's layout: <index:05d>/{metadata.jsonl,"
                                                        "samples/*.png}")
    parser.add_argument("--detector", default=None, help="'module:attr' of a Detector (default: the Shapes "
                                                         "verifier's detector)")
    parser.add_argument("--out", default=None, help="also write the per-image records (GenEval results.jsonl)")
    args = parser.parse_args(argv)
    summary = score_geneval_folder(args.images, args.detector, args.out)
    print(format_summary(summary))
    print(json.dumps({"overall": summary["overall"]} | {t: v["correct"] for t, v in summary["tags"].items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
