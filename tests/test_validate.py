"""The GX suite over shard metadata: passes on good data, fails on each planted defect with that expectation named."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from unirl.data.shard_writer import write_shards
from unirl.data.shards import Record
from unirl.data.validate import (
    TABLE_COLUMNS,
    ValidationError,
    ValidationSpec,
    make_context,
    metadata_table,
    raise_on_failure,
    validate_all,
    validate_shards,
    validate_table,
)

RES = 16
TAGS = ("counting", "colors", "position")
CLASSES = ("circle", "square", "triangle")
SPLITS = ("train", "train", "val", "test")


@pytest.fixture(scope="module")
def context():
    return make_context()


def _record(
    i: int,
    tag: str | None = None,
    count: int = 2,
    cls: str = "circle",
    size: int = RES,
    prompt: str | None = None,
    images: bool = True,
) -> Record:
    tag = tag or TAGS[i % len(TAGS)]
    prompt = f"a photo of {count} {cls}s number {i}" if prompt is None else prompt
    md = {"tag": tag, "include": [{"class": cls, "count": count}, {"class": "square", "count": 1}], "prompt": prompt}
    img = Image.fromarray(np.full((size, size, 3), i % 255, dtype=np.uint8))  # (H, W, 3)
    return Record(
        "t2i",
        {"png": img} if images else {},
        {"task": "t2i", "tag": tag, "prompt": prompt, "resolution": RES, "metadata": md},
    )


def _write(root: Path, overrides: dict[int, dict[str, Any]] | None = None, n: int = 12, task: str = "t2i"):
    overrides = overrides or {}
    triples = [(f"{task}_{i:03d}", SPLITS[i % 4], _record(i, **overrides.get(i, {}))) for i in range(n)]
    for _, _, rec in triples:
        rec.task = rec.meta["task"] = task
    write_shards(triples, root, task)


def _validate(root: Path, context, task: str = "t2i", **kw):
    args = dict(resolution=RES, allowed_tags=TAGS, allowed_classes=CLASSES, tag_balance_tolerance=0.5)
    args.update(kw)
    return validate_shards(root, task, context=context, **args)


def test_metadata_table(tmp_path: Path) -> None:
    triples = [(f"t2i_{i:03d}", SPLITS[i % 4], _record(i, count=i + 1)) for i in range(4)]
    triples[2][2].meta["scene"] = {"objects": [["circle", "red", 0.5, 0.5]]}
    triples.append(("txt_0", "train", Record("t2i", {}, {"task": "t2i", "tag": "colors", "prompt": "text only"})))
    two_sizes = {"png": Image.new("RGB", (RES, RES)), "tgt.png": Image.new("RGB", (8, 8))}
    triples.append(("odd_0", "val", Record("t2i", two_sizes, {"task": "t2i", "tag": "colors", "prompt": "two"})))
    write_shards(triples, tmp_path, "t2i")
    df = metadata_table(tmp_path, "t2i").set_index("key")
    assert list(df.reset_index().columns) == list(TABLE_COLUMNS) and len(df) == 6
    row = df.loc["t2i_002"]
    assert (row.task, row.split, row.tag, row.shard) == ("t2i", "val", "position", "t2i/val-000000.tar")
    assert (row.n_include, row.classes, row.max_count, row.min_count) == (2, "circle,square", 3, 1)
    assert (row.width, row.height, row.n_images, bool(row.sizes_agree)) == (RES, RES, 1, True)
    assert row.prompt == "a photo of 3 circles number 2"
    assert row.scene_id == hashlib.sha1(b'{"objects": [["circle", "red", 0.5, 0.5]]}').hexdigest()[:16]
    assert pd.isna(df.loc["t2i_001"].scene_id)
    txt = df.loc["txt_0"]
    assert txt.n_images == 0 and txt.classes == "" and txt.n_include == 0
    assert pd.isna(txt.width) and pd.isna(txt.height) and pd.isna(txt.max_count) and pd.isna(txt.sizes_agree)
    odd = df.loc["odd_0"]
    assert (odd.width, odd.height, odd.n_images) == (RES, RES, 2) and not odd.sizes_agree  # main image is "png"


def test_good_data_passes(tmp_path: Path, context) -> None:
    _write(tmp_path)
    report = _validate(tmp_path, context, report_path=tmp_path / "reports" / "t2i.json")
    assert report.success, report.summary
    assert report.n_rows == 12 and report.failed == [] and report.summary.endswith(": OK")
    names = {r.name for r in report.results}
    assert {
        "prompt_not_empty",
        "tag_known",
        "class_known",
        "max_count_in_range",
        "width_is_resolution",
        "key_unique",
        "splits_disjoint_by_prompt",
        "tag_balance",
        "image_present",
    } <= names
    assert report.evaluated == len(report.results) == len(names)
    saved = json.loads((tmp_path / "reports" / "t2i.json").read_text())
    assert saved["success"] is True and saved["n_rows"] == 12 and len(saved["results"]) == report.evaluated
    raise_on_failure(report)  # does not raise


# index -> overrides of that sample; the expected failed expectations; the keys (or tags) reported as unexpected
PLANTED = {
    "empty prompt": ({3: {"prompt": "  "}}, {"prompt_not_empty"}, ["t2i_003"]),
    "unknown tag": ({4: {"tag": "mystery"}}, {"tag_known"}, ["t2i_004"]),
    "unknown class": ({5: {"cls": "hexagon"}}, {"class_known"}, ["t2i_005"]),
    "count 7": ({6: {"count": 7}}, {"max_count_in_range"}, ["t2i_006"]),
    "count 0": ({6: {"count": 0}}, {"min_count_in_range"}, ["t2i_006"]),
    "wrong size": ({7: {"size": RES * 2}}, {"width_is_resolution", "height_is_resolution"}, ["t2i_007"]),
    "text-only in t2i": ({8: {"images": False}}, {"image_present"}, ["t2i_008"]),
    # samples 0 (train) and 2 (val) share a prompt
    "prompt in two splits": (
        {2: {"prompt": "a photo of 2 circles number 0"}},
        {"splits_disjoint_by_prompt"},
        ["t2i_000", "t2i_002"],
    ),
    # 10 of 12 samples tagged "counting": ratios 2.5, 0.25, 0.25 vs tolerance 0.5
    "unbalanced tags": (
        {i: {"tag": "counting"} for i in range(12) if i not in (1, 2)},
        {"tag_balance"},
        ["colors", "counting", "position"],
    ),
}


@pytest.mark.parametrize("case", sorted(PLANTED))
def test_planted_defect_fails_its_expectation(tmp_path: Path, context, case: str) -> None:
    overrides, expected, keys = PLANTED[case]
    _write(tmp_path, overrides)
    report = _validate(tmp_path, context)
    assert not report.success
    assert set(report.failed) == expected, report.summary
    for name in expected:
        assert name in report.summary
        outcome = next(r for r in report.results if r.name == name)
        assert sorted(outcome.unexpected_keys) == keys and outcome.unexpected_count == len(keys)
    with pytest.raises(ValidationError, match="|".join(sorted(expected))):
        raise_on_failure(report)


def test_unexpected_values_reported(tmp_path: Path, context) -> None:
    _write(tmp_path, {6: {"count": 7}, 7: {"size": RES * 2}})
    report = _validate(tmp_path, context)
    by_name = {r.name: r for r in report.results}
    assert by_name["max_count_in_range"].unexpected_examples == [7]
    assert by_name["width_is_resolution"].unexpected_examples == [RES * 2]
    assert "t2i_007" in report.summary and "width_is_resolution" in report.summary
    json.dumps(report.to_dict())  # JSON-clean (no numpy scalars)


def test_text_only_rows_allowed_for_text_tasks(tmp_path: Path, context) -> None:
    _write(tmp_path, {i: {"images": False} for i in range(0, 12, 2)}, task="understand")
    report = _validate(tmp_path, context, task="understand")
    assert report.success, report.summary
    assert "image_present" not in {r.name for r in report.results}


def test_scene_disjointness_is_opt_in(tmp_path: Path, context) -> None:
    triples = []
    for i in range(8):  # the same scene under two prompts in two splits
        rec = _record(i)
        rec.meta["scene"] = {"objects": [["circle", "red", i // 2]]}
        triples.append((f"t2i_{i:03d}", ("train", "val")[i % 2], rec))
    write_shards(triples, tmp_path, "t2i")
    assert _validate(tmp_path, context, tag_balance_tolerance=None).success
    report = _validate(tmp_path, context, tag_balance_tolerance=None, disjoint_by=("prompt", "scene_id"))
    assert report.failed == ["splits_disjoint_by_scene"]


def test_missing_or_broken_shards_fail_readably(tmp_path: Path, context) -> None:
    report = _validate(tmp_path, context)
    assert not report.success and report.failed == ["shards_readable"] and "unirl curate" in report.summary
    _write(tmp_path)
    shard = tmp_path / "t2i" / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    report = _validate(tmp_path, context)
    assert report.failed == ["shards_readable"] and "train-000000.tar" in report.summary


def test_validate_all_writes_combined_report(tmp_path: Path, context) -> None:
    _write(tmp_path / "shards")
    _write(tmp_path / "shards", {1: {"tag": "mystery"}}, task="reflect")
    spec = ValidationSpec(resolution=RES, allowed_tags=TAGS, allowed_classes=CLASSES)
    reports = validate_all(
        tmp_path / "shards", {"t2i": spec, "reflect": spec}, report_path=tmp_path / "report.json", context=context
    )
    assert reports["t2i"].success and reports["reflect"].failed == ["tag_known"]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["success"] is False and saved["tasks"]["reflect"]["failed"] == ["tag_known"]
    with pytest.raises(ValidationError, match=r"reflect: tag_known .*'mystery'"):
        raise_on_failure(reports)


def test_erroring_expectation_is_a_failure_not_a_crash(tmp_path: Path, context) -> None:
    _write(tmp_path)
    df = metadata_table(tmp_path, "t2i").drop(columns=["classes"])
    report = validate_table(df, "t2i", ValidationSpec(RES, TAGS, CLASSES), context=context)
    assert report.failed == ["class_known"]
    outcome = next(r for r in report.results if r.name == "class_known")
    assert "classes" in outcome.error and "class_known" in report.summary
