"""Benchmarks: exact scoring on rendered scenes, seeded sampling of a tiny real UnifiedModel, the eval stage files."""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from unirl.data import tasks as task_lib
from unirl.data.shapes import Scene, render
from unirl.data.shard_writer import write_shards
from unirl.data.shards import read_samples
from unirl.data.verifier import DEFAULT_DETECTOR, score
from unirl.eval.benchmarks import (
    BENCHMARKS,
    Sampling,
    bench_cot,
    bench_edit,
    bench_geneval,
    bench_refine,
    bench_reflect,
    bench_vqa,
    parse_verdict,
    preservation,
    sample_images,
    sample_seed,
    select_balanced,
)
from unirl.eval.geneval import score_geneval_folder
from unirl.eval.report import HEADLINE, TABLE_COLUMNS, EvalConfig, run_eval
from unirl.models import load_model_config
from unirl.models.tiny import tiny_model
from unirl.rewards.text import answer_accuracy

GENEVAL_TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")


def write_test_shards(root: Path, per_tag: int = 2) -> Path:
    """Every task's test split (``per_tag`` samples per tag) + the GenEval prompt file, as curate writes them."""
    for task in task_lib.TASKS:
        def keyed(task=task):
            k = 0
            for tag in task_lib.TAGS[task]:
                rng = random.Random(f"bench-test|{task}|{tag}")
                for _ in range(per_tag):
                    yield f"{task}_test_{k:06d}", "test", task_lib.generate(task, rng, 32, tag=tag)
                    k += 1

        write_shards(keyed(), root / "shards", task)
    seen: dict[str, dict] = {}
    for s in read_samples(root / "shards" / "t2i", "test", decode=False):
        seen.setdefault(s.meta["metadata"]["prompt"], s.meta["metadata"])
    (root / "prompts").mkdir(parents=True, exist_ok=True)
    (root / "prompts" / "geneval.jsonl").write_text("".join(json.dumps(m) + "\n" for m in seen.values()))
    return root


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    torch.set_num_threads(1)
    root = write_test_shards(tmp_path_factory.mktemp("bench"))
    model = tiny_model(root / "work", seed=0).eval()
    model.save_pretrained(root / "models" / "sft")
    return root, model


# ------------------------------------------------------------------------------------------------ pure helpers
def test_seeds_and_balanced_selection():
    assert [sample_seed(0, i) for i in range(3)] == [0, 1, 2]
    assert sample_seed(2, 7) == 2 * 1_000_003 + 7
    items = [("b", 1), ("a", 1), ("b", 2), ("a", 2), ("a", 3), ("c", 1)]
    assert select_balanced(items, 4, tag=lambda x: x[0]) == [("a", 1), ("b", 1), ("c", 1), ("a", 2)]
    assert select_balanced(items, 100, tag=lambda x: x[0]) == [
        ("a", 1), ("b", 1), ("c", 1), ("a", 2), ("b", 2), ("a", 3)
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>looks right</think><answer>correct</answer>", ("correct", "")),
        ("<think>no</think>\n<answer>\nedit: make the circle red\n</answer>", ("incorrect", "make the circle red")),
        ("<answer>Correct.</answer>", (None, "")),
        ("<answer>edit:   </answer>", (None, "")),
        ("correct", (None, "")),
    ],
)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


def test_preservation_on_rendered_scenes():
    e = task_lib.generate("edit", random.Random("pres-remove|3"), 64, tag="remove").meta
    src = Scene.from_dict(e["source_scene"])
    n = len(src.objects)
    assert n >= 2  # remove: the removed object plus 1-2 others
    assert preservation(render(Scene.from_dict(e["scene"]), 64), e["source_scene"], e["edit"], DEFAULT_DETECTOR) == 1.0
    # Drop one untouched object from the target: one of the n - 1 untouched objects is missing.
    kept = [o for i, o in enumerate(src.objects) if i != e["edit"]["index"]]
    partial = Scene(tuple(kept[1:]))
    assert preservation(render(partial, 64), e["source_scene"], e["edit"], DEFAULT_DETECTOR) == pytest.approx(
        (n - 2) / (n - 1))
    blank = Image.new("RGB", (64, 64), (255, 255, 255))
    assert preservation(blank, e["source_scene"], e["edit"], DEFAULT_DETECTOR) == 0.0
    # add: every source object is untouched; recolor of a lone object: nothing to preserve.
    add = task_lib.generate("edit", random.Random("pres-add|1"), 64, tag="add").meta
    assert preservation(render(Scene.from_dict(add["source_scene"]), 64), add["source_scene"], add["edit"],
                        DEFAULT_DETECTOR) == 1.0
    lone = {"objects": [Scene.from_dict(e["source_scene"]).to_dict()["objects"][0]]}
    assert preservation(blank, lone, {"op": "recolor", "index": 0}, DEFAULT_DETECTOR) is None


# ------------------------------------------------------------------------------------- a tiny real UnifiedModel
def test_sample_images_matches_the_models_own_sampler(world):
    root, model = world
    sampling = Sampling.for_model(model, steps=2, seed=3, batch_size=2)
    prompts = ["a photo of a red circle", "a photo of two blue squares", "a photo of a green triangle"]
    seeds = [sample_seed(3, i) for i in range(3)]
    batched = sample_images(model, prompts, seeds, sampling)
    for p, s, im in zip(prompts, seeds, batched):
        own = model.generate_images([p], steps=2, cfg_scale=sampling.cfg_scale, seed=s)[0]
        diff = np.abs(np.asarray(own, np.int16) - np.asarray(im, np.int16))
        assert diff.max() <= 1, "batched per-sample seeding must reproduce generate_images(seed=...)"
    # Batch composition does not change a sample: the last prompt alone gives the same image.
    alone = sample_images(model, prompts[2:], seeds[2:], sampling)[0]
    assert np.abs(np.asarray(alone, np.int16) - np.asarray(batched[2], np.int16)).max() <= 1
    src = render(Scene.from_dict(task_lib.generate("edit", random.Random("x"), 32, tag="move").meta["source_scene"]),
                 32)
    edited = sample_images(model, ["move the circle up"], [seeds[0]], sampling, images=[src], task="i2i")[0]
    own = model.generate_images(["move the circle up"], images=[src], task="i2i", steps=2,
                                cfg_scale=sampling.cfg_scale, ref_cfg_scale=sampling.ref_cfg_scale, seed=seeds[0])[0]
    assert np.abs(np.asarray(own, np.int16) - np.asarray(edited, np.int16)).max() <= 1
    assert sampling.record()["unconditional"].startswith("zeroed connector output")


def test_geneval_benchmark_metrics_match_an_independent_rescoring(world, tmp_path):
    root, model = world
    metadatas = [json.loads(line) for line in (root / "prompts" / "geneval.jsonl").read_text().splitlines()]
    metadatas = select_balanced(metadatas, 6, tag=lambda md: md["tag"])
    sampling = Sampling.for_model(model, steps=2)
    res = bench_geneval(model, metadatas, sampling, DEFAULT_DETECTOR, images_per_prompt=2)
    assert set(res.metrics) == ({f"geneval/{t}" for t in GENEVAL_TAGS} | {"geneval/overall"}
                                | {f"geneval_score/{t}" for t in GENEVAL_TAGS} | {"geneval_score/overall"}
                                | {"geneval/correct_prompts"})
    assert len(res.images) == 6 and all(len(ims) == 2 for ims in res.images)
    # Independent re-scoring of the returned images with the verifier, by hand.
    per_tag: dict[str, list[bool]] = {}
    for md, ims in zip(metadatas, res.images):
        per_tag.setdefault(md["tag"], []).extend(bool(score(im, md)["correct"]) for im in ims)
    for tag, oks in per_tag.items():
        assert res.metrics[f"geneval/{tag}"] == pytest.approx(sum(oks) / len(oks))
    assert res.metrics["geneval/overall"] == pytest.approx(np.mean([sum(v) / len(v) for v in per_tag.values()]))
    again = bench_geneval(model, metadatas, sampling, DEFAULT_DETECTOR, images_per_prompt=2)
    assert all(a.tobytes() == b.tobytes() for x, y in zip(res.images, again.images) for a, b in zip(x, y))


def test_edit_vqa_reflect_benchmarks(world):
    root, model = world
    sampling = Sampling.for_model(model, steps=2, max_new_tokens=12)
    edits = list(read_samples(root / "shards" / "edit", "test"))[:3]
    res = bench_edit(model, edits, sampling, DEFAULT_DETECTOR)
    assert {"edit/correct", "edit/score"} <= set(res.metrics) and len(res.records) == 3
    assert res.metrics["edit/correct"] == pytest.approx(np.mean([r["correct"] for r in res.records]))

    questions = select_balanced(list(read_samples(root / "shards" / "understand", "test")), 5,
                                tag=lambda s: s.meta["tag"])
    res = bench_vqa(model, questions, sampling)
    completions = [r["completion"] for r in res.records]
    acc = answer_accuracy(completions, [s.meta["prompt"] for s in questions], [s.meta for s in questions])
    assert res.metrics["vqa/accuracy"] == pytest.approx(np.mean(acc))
    assert {f"vqa/{s.meta['tag']}" for s in questions} <= set(res.metrics)

    # Reflection: the score before is the verifier's on the judged renders, computed here independently.
    judged = list(read_samples(root / "shards" / "reflect", "test"))
    res = bench_reflect(model, judged, sampling, DEFAULT_DETECTOR)
    before = [score(s.images["png"], s.meta["metadata"])["score"] for s in judged]
    assert res.metrics["reflect/score_before"] == pytest.approx(np.mean(before))
    verdicts = [parse_verdict(r["completion"])[0] for r in res.records]
    right = [v == s.meta["verdict"] for v, s in zip(verdicts, judged)]
    assert res.metrics["reflect/judgement"] == pytest.approx(np.mean(right))
    if all(v != "incorrect" for v in verdicts):  # no edit asked: the images are unchanged
        assert res.metrics["reflect/score_after"] == res.metrics["reflect/score_before"]


def test_image_benchmarks_average_several_draws_per_prompt(world):
    """images_per_prompt k: every draw is judged (draw j of sample i from seed i * k + j, so draw 0 of sample 0
    is the one-draw image), the metric is their mean, each record the mean of its sample's draws."""
    root, model = world
    sampling = Sampling.for_model(model, steps=2, max_new_tokens=12)
    cot = select_balanced(list(read_samples(root / "shards" / "t2i_cot", "test")), 3, tag=lambda s: s.meta["tag"])
    one = bench_cot(model, cot, sampling, DEFAULT_DETECTOR)
    two = bench_cot(model, cot, sampling, DEFAULT_DETECTOR, images_per_prompt=2)
    assert len(two.records) == 3 and [r["completion"] for r in two.records] == [r["completion"] for r in one.records]
    for arm in ("with", "without"):
        assert two.metrics[f"cot/{arm}_reasoning"] == pytest.approx(np.mean([r[f"{arm}_score"] for r in two.records]))
    assert two.previews[0][0].tobytes() == one.previews[0][0].tobytes()
    # The draws are the model's own sampler at the stated seeds, judged by the verifier independently here.
    md = cot[1].meta["metadata"]
    prompt = cot[1].meta["prompt"]
    redo = [score(im, md)["score"] for im in sample_images(model, [prompt, prompt], [sample_seed(0, 2),
                                                                                     sample_seed(0, 3)], sampling)]
    assert two.records[1]["without_score"] == pytest.approx(np.mean(redo))

    refine = list(read_samples(root / "shards" / "prompt_refine", "test"))[:2]
    res = bench_refine(model, refine, sampling, DEFAULT_DETECTOR, images_per_prompt=3)
    assert res.metrics["refine/raw_score"] == pytest.approx(np.mean([r["raw_score"] for r in res.records]))
    edits = list(read_samples(root / "shards" / "edit", "test"))[:2]
    res = bench_edit(model, edits, sampling, DEFAULT_DETECTOR, images_per_prompt=2)
    assert res.metrics["edit/correct"] == pytest.approx(np.mean([r["correct"] for r in res.records]))
    with pytest.raises(ValueError, match="images_per_prompt must be >= 1"):
        bench_edit(model, edits, sampling, DEFAULT_DETECTOR, images_per_prompt=0)


# ------------------------------------------------------------------------------------------- the eval stage
def test_run_eval_writes_results_tables_grids_and_one_mlflow_run(world, tmp_path, monkeypatch, caplog):
    root, _ = world
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ckpts = tmp_path / "models"
    shutil.copytree(root / "models" / "sft", ckpts / "sft")
    shutil.copytree(root / "models" / "sft", ckpts / "rl_t2i")  # same weights: must give the same numbers
    cfg = EvalConfig(
        checkpoints={"sft": str(ckpts / "sft"), "rl_t2i": str(ckpts / "rl_t2i"), "rl_edit": str(ckpts / "rl_edit")},
        shards_dir=str(root / "shards"), geneval_metadata=str(root / "prompts" / "geneval.jsonl"),
        n_prompts={"geneval": 6, "edit": 2, "cot": 2, "vqa": 3, "reflect": 2, "refine": 2}, images_per_prompt=1,
        steps=2, max_new_tokens=8, out_dir=str(tmp_path / "eval"), preview_prompts=2, dvc_lock=str(tmp_path / "x"),
    )
    with caplog.at_level(logging.WARNING, logger="unirl.eval.report"):
        results = run_eval(cfg, progress=False)
    assert any("'rl_edit' skipped" in r.getMessage() for r in caplog.records)

    out = tmp_path / "eval"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["checkpoints"] == results["checkpoints"] and list(on_disk["checkpoints"]) == ["sft", "rl_t2i"]
    assert on_disk["headline"] == HEADLINE == {
        "t2i": "geneval/overall", "edit": "edit/correct", "t2i_cot": "cot/with_reasoning",
        "understand": "vqa/accuracy", "prompt_refine": "refine/score", "reflect": "reflect/judgement"}
    assert on_disk["skipped"] == {"rl_edit": str(ckpts / "rl_edit")}
    sft = on_disk["checkpoints"]["sft"]
    assert {f"geneval/{t}" for t in GENEVAL_TAGS} | set(HEADLINE.values()) <= set(sft)
    assert on_disk["checkpoints"]["rl_t2i"] == sft  # same weights, same prompts, same seeds
    sampling = on_disk["settings"]["benchmarks"]["geneval"]["sampling"]["sft"]
    keys = ("steps", "cfg_scale", "cfg_schedule", "resolution", "seed")
    profile = load_model_config("tiny").sampling  # the checkpoint's own guidance, recorded with its numbers
    assert {k: sampling[k] for k in keys} == {"steps": 2, "cfg_scale": profile.cfg_scale,
                                              "cfg_schedule": profile.cfg_schedule, "resolution": 32, "seed": 0}
    assert "zeroed" in sampling["unconditional"] and sampling["decoding"].startswith("greedy")
    assert set(on_disk["settings"]["benchmarks"]) == set(BENCHMARKS)

    table = json.loads((out / "table.json").read_text())
    assert table["columns"] == ["checkpoint", *TABLE_COLUMNS] and [r["checkpoint"] for r in table["rows"]] == [
        "sft", "rl_t2i"]
    md = (out / "table.md").read_text().splitlines()
    assert md[0].startswith("| checkpoint | geneval/overall |") and len(md) == 4
    flat = json.loads((out / "metrics.json").read_text())
    assert flat["sft/geneval/overall"] == sft["geneval/overall"]
    g = sft["geneval/overall"]
    assert json.loads((out / "plots" / "geneval__overall.json").read_text()) == [
        {"checkpoint": "sft", "value": g}, {"checkpoint": "rl_t2i", "value": g}]
    for bench in BENCHMARKS:
        assert Image.open(out / "grids" / f"{bench}.png").size[0] > 0
    rescored = score_geneval_folder(out / "geneval" / "sft")  # the saved GenEval folder gives the same numbers
    assert rescored["overall"] == pytest.approx(sft["geneval/overall"])

    client = mlflow.MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("eval").experiment_id])
    assert len(runs) == 1 and runs[0].data.metrics["sft/geneval/overall"] == sft["geneval/overall"]
    assert {"results.json", "table.md", "grids"} <= {a.path for a in client.list_artifacts(runs[0].info.run_id)}


def test_eval_errors_are_clear(tmp_path):
    cfg = EvalConfig(checkpoints={"sft": str(tmp_path / "nope")}, out_dir=str(tmp_path / "eval"), tracking=False)
    with pytest.raises(FileNotFoundError, match="none of the eval checkpoints exists"):
        run_eval(cfg, progress=False)
    with pytest.raises(ValueError, match="unknown name"):
        run_eval(EvalConfig(benchmarks=["geneval", "nope"]), progress=False)
