"""The GenEval folder runner on a folder laid out as GenEval's generation script writes it, with rendered Shapes."""

from __future__ import annotations

import json
import random

import pytest
from PIL import Image

from unirl.data import tasks as task_lib
from unirl.data.verifier import Detection, ShapesDetector
from unirl.eval.geneval import (
    format_summary,
    main,
    score_geneval_folder,
    score_records,
    summarize,
    write_geneval_folder,
)

# (tag, [True = the render of the prompt's scene, False = a blank canvas]) per prompt folder.
LAYOUT = [
    ("single_object", [True, False]),
    ("counting", [True, True, False]),
    ("colors", [False]),
    ("position", [True]),
    ("single_object", [True]),
]
# GenEval's summary by hand: per tag, correct images / images; overall = mean over tags.
EXPECTED = {"single_object": 2 / 3, "counting": 2 / 3, "colors": 0.0, "position": 1.0}


def _samples() -> list[task_lib.Sample]:
    return [task_lib.generate("t2i", random.Random(f"geneval-runner|{i}"), 32, tag=tag)
            for i, (tag, _) in enumerate(LAYOUT)]


@pytest.fixture
def folder(tmp_path):
    """A GenEval image folder written by hand (not with write_geneval_folder), plus files GenEval ignores."""
    root = tmp_path / "images"
    blank = Image.new("RGB", (32, 32), (255, 255, 255))
    for i, ((_, which), s) in enumerate(zip(LAYOUT, _samples())):
        sub = root / f"{i:05d}"
        (sub / "samples").mkdir(parents=True)
        (sub / "metadata.jsonl").write_text(json.dumps(s.meta["metadata"]) + "\n")
        for k, good in enumerate(which):
            (s.images["png"] if good else blank).save(sub / "samples" / f"{k:05d}.png")
        s.images["png"].save(sub / "grid.png")  # GenEval's own grid: not a sample
    (root / "notes").mkdir()  # not an index folder: ignored
    (root / "README.txt").write_text("ignored")
    return root


def test_folder_runner_reports_geneval_summary(folder, tmp_path, capsys):
    summary = score_geneval_folder(folder)
    assert summary["images"] == 8 and summary["prompts"] == 5
    assert list(summary["tags"]) == ["single_object", "counting", "colors", "position"]  # first-seen order
    for tag, acc in EXPECTED.items():
        assert summary["tags"][tag]["correct"] == pytest.approx(acc, abs=1e-12), tag
    assert summary["overall"] == pytest.approx(sum(EXPECTED.values()) / 4, abs=1e-12)
    assert summary["correct_images"] == pytest.approx(5 / 8)
    assert summary["correct_prompts"] == pytest.approx(4 / 5)  # a prompt counts when any of its images is correct
    # Partial score: 1 for a correct render, 0 for a blank canvas (every include clause finds nothing).
    assert summary["tags"]["counting"]["score"] == pytest.approx(2 / 3)
    assert summary["overall_score"] == pytest.approx(sum(EXPECTED.values()) / 4)

    out = tmp_path / "results.jsonl"
    assert main(["--images", str(folder), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert json.loads(printed[-1]) == pytest.approx({"overall": sum(EXPECTED.values()) / 4} | EXPECTED)
    assert list(json.loads(printed[-1])) == ["overall", "single_object", "counting", "colors", "position"]
    assert "Overall score (avg. over tasks): 0.58333" in printed
    assert any(line.startswith("counting         = 66.67% (2 / 3)") for line in printed)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and {"tag", "prompt", "correct", "score", "reason", "metadata"} <= set(records[0])
    assert sum(r["correct"] for r in records) == 5


def test_pluggable_detector(folder):
    class Nothing:
        """A detector that sees nothing, with its own vocabulary."""

        classes = ("circle", "square", "triangle")

        def __call__(self, image: Image.Image) -> list[Detection]:
            return []

    blind = score_geneval_folder(folder, detector=Nothing())
    assert blind["overall"] == 0.0 and blind["correct_images"] == 0.0
    by_path = score_geneval_folder(folder, detector="unirl.data.verifier:ShapesDetector")  # a class: instantiated
    assert by_path["overall"] == pytest.approx(sum(EXPECTED.values()) / 4)


def test_write_geneval_folder_round_trip(tmp_path):
    samples = _samples()
    mds = [s.meta["metadata"] for s in samples]
    images = [[s.images["png"], s.images["png"].rotate(180)] for s in samples]
    root = write_geneval_folder(tmp_path / "gen", mds, images)
    assert sorted(p.name for p in root.iterdir()) == [f"{i:05d}" for i in range(len(samples))]
    assert len((root / "00000" / "metadata.jsonl").read_text().strip().splitlines()) == 1  # one JSON line
    direct = summarize(score_records([im for ims in images for im in ims], [m for m in mds for _ in range(2)],
                                     ShapesDetector()))
    from_disk = score_geneval_folder(root)
    assert {k: from_disk[k] for k in direct} == direct
    assert "Task breakdown" in format_summary(direct)


def test_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        score_geneval_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a GenEval image folder"):
        score_geneval_folder(tmp_path / "empty")
    bad = tmp_path / "bad" / "00000"
    (bad / "samples").mkdir(parents=True)
    (bad / "metadata.jsonl").write_text(json.dumps({"tag": "counting", "prompt": "x", "include": [{"class": "c"}]}))
    with pytest.raises(ValueError, match=r"00000/metadata.jsonl: include\[0\].count"):
        score_geneval_folder(tmp_path / "bad")
    with pytest.raises(ValueError, match="no GenEval records"):
        summarize([])


def test_unirl_eval_geneval_command(folder, capsys):
    from unirl.cli import main as unirl_main

    assert unirl_main(["eval", "geneval", "--images", str(folder)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last == pytest.approx({"overall": sum(EXPECTED.values()) / 4} | EXPECTED)
