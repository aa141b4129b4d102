"""The curate stage end to end on a small config: shards, splits, corpus, manifest, GenEval prompt file."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from unirl.config import load_config
from unirl.data import tasks as task_lib
from unirl.data.curate import CurateConfig, assign_splits, curate, curate_task, task_dir
from unirl.data.shards import read_samples
from unirl.data.verifier import load_geneval_metadata, score


def test_assign_splits_is_deterministic_disjoint_and_covers_every_split():
    strata = {
        "circle": [f"p{i}" for i in range(10)],
        "square": ["q0", "q1", "q2"],
        "a": ["r0"],
        "b": ["r1"],
        "c": ["r2"],
    }
    a = assign_splits(strata, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, salt="t2i")
    b = assign_splits(strata, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=0, salt="t2i")
    assert a == b
    assert set(a) == {p for ps in strata.values() for p in ps}
    for stratum in ("circle", "square"):
        assert {a[p] for p in strata[stratum]} == {"train", "val", "test"}
    assert {a[p] for p in ("r0", "r1", "r2")} == {"train", "val", "test"}  # small strata are pooled
    c = assign_splits(strata, {"train": 0.8, "val": 0.1, "test": 0.1}, seed=1, salt="t2i")
    assert a != c


def test_assign_splits_rejects_bad_fractions():
    with pytest.raises(ValueError, match="split_fractions"):
        assign_splits({"x": ["a"]}, {"train": 0, "val": 0, "test": 0}, 0, "t")


@pytest.fixture(scope="module")
def curated(tmp_path_factory) -> tuple[CurateConfig, dict]:
    from conftest import small_params

    tmp = tmp_path_factory.mktemp("curate")
    cfg = load_config(CurateConfig, "curate", small_params(tmp, per_tag=12))
    return cfg, curate(cfg, progress=False)


def test_every_task_has_all_splits_and_keys_without_dots(curated):
    cfg, manifest = curated
    for task in task_lib.TASKS:
        entry = manifest["tasks"][task]
        assert set(entry["splits"]) >= {"train", "val", "test"}, task
        assert sum(entry["splits"].values()) == 12 * len(task_lib.TAGS[task])
        for split in ("train", "val", "test"):
            assert list(task_dir(cfg, task).glob(f"{split}-*.tar")), (task, split)
        assert entry["verifier_agreement"]["agreement"] >= 0.99


def test_splits_are_disjoint_by_prompt_and_match_the_manifest(curated):
    cfg, manifest = curated
    for task in task_lib.TASKS:
        prompts = defaultdict(set)
        for split in ("train", "val", "test"):
            n = 0
            for s in read_samples(task_dir(cfg, task), split):
                assert "." not in s.key and s.key.startswith(f"{task}_{split}_")
                assert s.meta["split"] == split and s.meta["task"] == task
                prompts[split].add(s.meta["prompt"])
                n += 1
            assert n == manifest["tasks"][task]["splits"][split]
        assert not prompts["train"] & prompts["test"], task
        assert not prompts["train"] & prompts["val"], task
        assert not prompts["val"] & prompts["test"], task


def test_shard_images_satisfy_their_metadata(curated):
    cfg, _ = curated
    for s in read_samples(task_dir(cfg, "t2i"), "test"):
        assert s.images["png"].size == (cfg.resolution, cfg.resolution)
        assert score(s.images["png"], s.meta["metadata"])["correct"], s.meta["prompt"]


def test_corpus_manifest_and_geneval_file(curated):
    cfg, manifest = curated
    corpus = Path(cfg.corpus_path).read_text().splitlines()
    assert len(corpus) == manifest["corpus"]["lines"] > 0
    assert all(line.strip() for line in corpus)
    assert "<answer>" in "\n".join(corpus)  # LM responses are in the corpus
    on_disk = json.loads((Path(cfg.out_dir) / "manifest.json").read_text())
    assert on_disk["tasks"].keys() == set(task_lib.TASKS)
    assert Path(manifest["preview"]).stat().st_size > 0
    rows = load_geneval_metadata(cfg.geneval_path)
    assert rows and {r["tag"] for r in rows} <= set(task_lib.TAGS["t2i"])
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_curate_is_deterministic(curated, tmp_path):
    from conftest import small_params

    cfg, manifest = curated
    cfg2 = load_config(CurateConfig, "curate", small_params(tmp_path, per_tag=12))
    m2 = curate_task(cfg2, "edit", progress=False)
    assert [s["sha256"] for s in m2["shards"]] == [s["sha256"] for s in manifest["tasks"]["edit"]["shards"]]


def test_bad_config_gets_a_clear_error(tmp_path):
    cfg = CurateConfig(out_dir=str(tmp_path), samples_per_tag={"t2i": 0})
    with pytest.raises(ValueError, match=r"samples_per_tag\['t2i'\]"):
        curate_task(cfg, "t2i", progress=False)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        curate_task(cfg, "nope", progress=False)
