"""Tests for the deterministic verifier: detection, colour naming, GenEval rules, metadata files, accuracy."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from unirl.data.shapes import PALETTE, RELATIONS, SIZES, Obj, Scene, relation_holds, render
from unirl.data.verifier import (
    Detection,
    ShapesDetector,
    classify_color,
    detect,
    evaluate,
    load_geneval_metadata,
    relative_position,
    score,
    score_batch,
)

ROOT = Path(__file__).resolve().parent.parent


def det(cls: str, box: tuple[int, int, int, int], color: str = "red", conf: float = 1.0) -> Detection:
    return Detection(cls, color, box, (box[2] - box[0]) * (box[3] - box[1]), conf)


SCENE = Scene(
    (
        Obj("circle", "red", "small", 0.25, 0.25),
        Obj("square", "blue", "large", 0.72, 0.28),
        Obj("triangle", "green", "large", 0.30, 0.72),
        Obj("circle", "yellow", "large", 0.74, 0.74),
    )
)


# ---------------------------------------------------------------- detection


@pytest.mark.parametrize("res", [32, 64, 256])
def test_detect_hand_built_scene(res):
    dets = detect(render(SCENE, res))
    assert sorted((d.cls, d.color) for d in dets) == sorted((o.shape, o.color) for o in SCENE.objects)
    for o in SCENE.objects:
        d = next(d for d in dets if (d.cls, d.color) == (o.shape, o.color))
        side = 2 * SIZES[o.size] * res * (0.85 if o.shape == "square" else 1.0)  # as shapes.render draws it
        assert abs(d.center[0] - o.cx * res) <= 1.0 and abs(d.center[1] - o.cy * res) <= 1.0
        assert abs((d.box[2] - d.box[0]) - side) <= 1.5 and abs((d.box[3] - d.box[1]) - side) <= 1.5
        assert d.area <= (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) and 0.5 <= d.score <= 1.0


def test_detect_empty_and_specks():
    assert detect(Image.new("RGB", (64, 64), "white")) == []
    img = render(SCENE, 64)
    px = img.load()
    for xy in [(3, 40), (40, 3), (60, 60), (20, 50)]:  # isolated coloured pixels: below the area floor
        px[xy] = (255, 0, 0)
    assert sorted((d.cls, d.color) for d in detect(img)) == sorted((o.shape, o.color) for o in SCENE.objects)


def _draw(bg, fills, size=64) -> Image.Image:
    """A circle, a square and a triangle drawn directly with PIL (not shapes.render), in ``fills``."""
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    s = size / 64
    d.ellipse([6 * s, 6 * s, 26 * s, 26 * s], fill=fills[0])
    d.rectangle([38 * s, 6 * s, 57 * s, 25 * s], fill=fills[1])
    d.polygon([(16 * s, 36 * s), (5 * s, 58 * s), (27 * s, 58 * s)], fill=fills[2])
    return img


OTHER_RGB = {
    "red": [(255, 0, 0), (200, 30, 30), (220, 20, 60)],
    "orange": [(245, 140, 20), (255, 165, 0), (255, 140, 0)],
    "yellow": [(255, 255, 0), (255, 215, 0)],
    "green": [(0, 128, 0), (0, 255, 0), (34, 139, 34)],
    "blue": [(0, 0, 255), (65, 105, 225), (30, 144, 255)],
    "purple": [(128, 0, 128), (148, 0, 211), (255, 0, 255)],
}


@pytest.mark.parametrize("name,rgb", [(n, c) for n, cs in OTHER_RGB.items() for c in cs])
@pytest.mark.parametrize("bg", [(255, 255, 255), (40, 40, 40), (150, 150, 150)])
def test_other_programs_rgb_values(name, rgb, bg):
    assert classify_color(rgb) == name
    dets = detect(_draw(bg, [rgb] * 3))
    assert sorted((d.cls, d.color) for d in dets) == [("circle", name), ("square", name), ("triangle", name)]


def test_classify_color_extra_names_and_palette():
    assert {n: classify_color(c) for n, c in PALETTE.items()} == {n: n for n in PALETTE}
    assert [
        classify_color(c) for c in [(255, 192, 203), (139, 69, 19), (0, 0, 0), (255, 255, 255), (128, 128, 128)]
    ] == [
        "pink",
        "brown",
        "black",
        "white",
        "gray",
    ]


def test_achromatic_and_antialiased_objects():
    dets = detect(_draw((255, 255, 255), [(0, 0, 0)] * 3))
    assert sorted((d.cls, d.color) for d in dets) == [("circle", "black"), ("square", "black"), ("triangle", "black")]
    # Drawn at 4x and downsampled with a Lanczos filter: antialiased edges, as most programs produce.
    big = _draw((255, 255, 255), [(255, 0, 0), (0, 0, 255), (0, 128, 0)], size=256)
    dets = detect(big.resize((64, 64), Image.Resampling.LANCZOS))
    assert sorted((d.cls, d.color) for d in dets) == [("circle", "red"), ("square", "blue"), ("triangle", "green")]


def test_touching_objects_of_different_colours_are_two_detections():
    img = Image.new("RGB", (64, 64), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([8, 20, 27, 39], fill=(255, 0, 0))
    d.rectangle([28, 20, 47, 39], fill=(0, 0, 255))  # shares an edge with the red square
    dets = detect(img)
    assert sorted((x.cls, x.color, x.box) for x in dets) == [
        ("square", "blue", (28, 20, 48, 40)),
        ("square", "red", (8, 20, 28, 40)),
    ]


def test_noise_and_blur_robustness():
    rng = np.random.default_rng(0)
    truth = sorted((o.shape, o.color) for o in SCENE.objects)
    for res in (64, 256):
        img = render(SCENE, res).filter(ImageFilter.GaussianBlur(1.0))
        noisy = np.clip(np.asarray(img, np.float32) + rng.normal(0, 20, (res, res, 3)), 0, 255).astype(np.uint8)
        assert sorted((d.cls, d.color) for d in detect(Image.fromarray(noisy))) == truth


def test_area_floor_scales_with_resolution():
    det_ = ShapesDetector(min_area_frac=0.05)  # floor above a small circle's area at any resolution
    for res in (32, 256):
        dets = det_(render(Scene((Obj("circle", "red", "small", 0.5, 0.5),)), res))
        assert dets == []
        assert len(detect(render(Scene((Obj("circle", "red", "small", 0.5, 0.5),)), res))) == 1


# ---------------------------------------------------------------- GenEval position rule


def test_relative_position_margin():
    b = det("square", (50, 50, 60, 60))  # sizes sum to 20 px per axis: dead zone 2 px
    # Pure horizontal offset o: relation iff (|o| - 2) / |o| > 0.5, i.e. |o| > 4.
    assert relative_position(det("circle", (46, 50, 56, 60)), b) == set()  # o = -4: exactly on the boundary
    assert relative_position(det("circle", (45, 50, 55, 60)), b) == {"left of"}  # o = -5
    assert relative_position(det("circle", (55, 50, 65, 60)), b) == {"right of"}
    assert relative_position(det("circle", (50, 40, 60, 50)), b) == {"above"}
    assert relative_position(det("circle", (50, 62, 60, 72)), b) == {"below"}
    assert relative_position(det("circle", (51, 51, 61, 61)), b) == set()  # inside the dead zone
    assert relative_position(det("circle", (30, 30, 40, 40)), b) == {"left of", "above"}  # diagonal


def test_relative_position_mirrors_shapes_relation_holds():
    rng = random.Random(0)
    res = 1000  # boxes in pixels = normalised boxes x 1000, kept as floats
    for _ in range(500):
        a, b = (Obj("circle", "red", rng.choice(list(SIZES)), rng.random(), rng.random()) for _ in range(2))
        da, db = (Detection("circle", "red", tuple(v * res for v in o.box()), 1, 1.0) for o in (a, b))
        assert relative_position(da, db) == {r for r in RELATIONS if relation_holds(a, b, r)}


# ---------------------------------------------------------------- GenEval scoring rules


def md(include, exclude=None, tag="t"):
    out = {"tag": tag, "include": include, "prompt": "p"}
    if exclude is not None:
        out["exclude"] = exclude
    return out


COUNT2 = md([{"class": "circle", "count": 2}], [{"class": "circle", "count": 3}])


@pytest.mark.parametrize(
    "n_found,correct,value,reason",
    [
        (0, False, 0.0, "expected 2 circle, found 0"),
        (1, False, 0.5, "expected 2 circle, found 1"),
        (2, True, 1.0, "ok"),
        (3, False, 0.5, "expected 2 circle, found 3"),
        (5, False, 0.0, "expected 2 circle, found 5"),  # 1 - 3/2 < 0 is clipped to 0
    ],
)
def test_counting_partial_score(n_found, correct, value, reason):
    dets = [det("circle", (10 * i, 0, 10 * i + 8, 8)) for i in range(n_found)]
    assert evaluate(dets, COUNT2) == {"correct": correct, "score": value, "reason": reason}


def test_exclude_clause_alone_decides_correct():
    m = md([], [{"class": "triangle", "count": 1}])
    assert evaluate([det("circle", (0, 0, 5, 5))], m) == {"correct": True, "score": 1.0, "reason": "ok"}
    out = evaluate([det("triangle", (0, 0, 5, 5))], m)
    assert out == {"correct": False, "score": 0.0, "reason": "expected fewer than 1 triangle, found 1"}


def test_colour_subterm():
    m = md([{"class": "circle", "count": 2, "color": "red"}])
    both = [det("circle", (0, 0, 8, 8), "red"), det("circle", (20, 0, 28, 8), "red")]
    assert evaluate(both, m)["score"] == 1.0
    one = [det("circle", (0, 0, 8, 8), "red"), det("circle", (20, 0, 28, 8), "blue")]
    out = evaluate(one, m)
    assert (out["correct"], out["score"]) == (False, 0.75)  # terms: count 1, colour 1 - 1/2
    assert out["reason"].startswith("expected 2 red circle, found 1 red")
    # Wrong count: one 0 for the colour term, the count term 1 - 1/2.
    assert evaluate(one[:1], m)["score"] == 0.25


def test_color_attribution_two_clauses():
    m = md([{"class": "circle", "count": 1, "color": "red"}, {"class": "square", "count": 1, "color": "blue"}])
    good = [det("circle", (0, 0, 8, 8), "red"), det("square", (20, 0, 28, 8), "blue")]
    assert evaluate(good, m) == {"correct": True, "score": 1.0, "reason": "ok"}
    swapped = [det("circle", (0, 0, 8, 8), "blue"), det("square", (20, 0, 28, 8), "red")]
    out = evaluate(swapped, m)
    assert (out["correct"], out["score"]) == (False, 0.5)  # terms 1, 0, 1, 0


POS = md([{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}])


def test_position_rule_terms():
    square = det("square", (40, 10, 50, 20))
    assert evaluate([square, det("circle", (10, 10, 20, 20))], POS) == {"correct": True, "score": 1.0, "reason": "ok"}
    out = evaluate([square, det("circle", (60, 10, 70, 20))], POS)
    assert out == {
        "correct": False,
        "score": pytest.approx(2 / 3),  # terms: 1, 1, 0
        "reason": "expected circle left of square, found circle right of square",
    }
    out = evaluate([det("circle", (10, 10, 20, 20))], POS)  # no square: no target for the relation
    assert (out["correct"], out["score"], out["reason"]) == (False, pytest.approx(1 / 3), "expected 1 square, found 0")
    m = md(
        [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "color": "red", "position": ["above", 0]}]
    )
    # Colour fails: the clause is unmatched and (as in GenEval's reward code) gets no position term: 1, 1, 0.
    out = evaluate([square, det("circle", (40, 40, 50, 50), "blue")], m)
    assert (out["correct"], out["score"]) == (False, pytest.approx(2 / 3))


@pytest.mark.parametrize("rel", RELATIONS)
def test_position_on_rendered_images(rel):
    offsets = {"left of": (-0.3, 0), "right of": (0.3, 0), "above": (0, -0.3), "below": (0, 0.3)}
    dx, dy = offsets[rel]
    scene = Scene((Obj("square", "blue", "small", 0.5, 0.5), Obj("circle", "red", "small", 0.5 + dx, 0.5 + dy)))
    m = md([{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": [rel, 0]}])
    for res in (32, 64, 256):
        assert score(render(scene, res), m)["correct"] is True
        wrong = {**m, "include": [m["include"][0], {**m["include"][1], "position": [_opposite(rel), 0]}]}
        assert score(render(scene, res), wrong)["correct"] is False


def _opposite(rel: str) -> str:
    return {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}[rel]


def test_unknown_class_and_plugged_detector():
    img = render(SCENE, 64)
    out = score(img, md([{"class": "dog", "count": 1}]))
    assert out["correct"] is False and out["score"] == 0.0
    assert out["reason"] == "class 'dog' unknown to this detector (it knows circle, square, triangle)"

    def coco_detector(image: Image.Image) -> list[Detection]:  # a stand-in real-object detector
        return [Detection("dog", "brown", (0, 0, image.width // 2, image.height // 2), 100, 0.9)]

    m = md([{"class": "dog", "count": 1, "color": "brown"}])
    assert score(img, m, detector=coco_detector, classes=None) == {"correct": True, "score": 1.0, "reason": "ok"}


def test_score_batch_matches_score_and_checks_lengths():
    imgs = [render(SCENE, 32), render(Scene(()), 32)]
    m = md([{"class": "circle", "count": 2}])
    assert score_batch(imgs, [m, m]) == [score(imgs[0], m), score(imgs[1], m)]
    assert [r["correct"] for r in score_batch(imgs, [m, m])] == [True, False]
    with pytest.raises(ValueError, match="2 images but 1 metadata"):
        score_batch(imgs, [m])


@pytest.mark.parametrize(
    "bad,match",
    [
        (md([{"class": "circle", "count": 0}]), r"include\[0\]\.count must be an integer >= 1"),
        (md([{"class": "circle", "count": 1, "color": "teal"}]), r"include\[0\]\.color must be one of"),
        (md([{"class": "circle", "count": 1, "position": ["left of", 0]}]), r"include\[0\]\.position"),
        (md([{"class": "circle", "count": 1, "colour": "red"}]), r"unknown key\(s\) \['colour'\]"),
        ({"include": [], "prompt": "p"}, "key 'tag' must be a string"),
    ],
)
def test_metadata_validation_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        evaluate([], bad)


# ---------------------------------------------------------------- GenEval metadata files

GENEVAL_LINES = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"},
    {
        "tag": "counting",
        "include": [{"class": "circle", "count": 2}],
        "exclude": [{"class": "circle", "count": 3}],
        "prompt": "a photo of two circles",
    },
    {
        "tag": "colors",
        "include": [{"class": "square", "count": 1, "color": "blue"}],
        "prompt": "a photo of a blue square",
    },
    {
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "triangle", "count": 1, "position": ["right of", 0]}],
        "prompt": "a photo of a triangle right of a square",
    },
    {
        "tag": "color_attr",
        "include": [
            {"class": "circle", "count": 1, "color": "red"},
            {"class": "triangle", "count": 1, "color": "green"},
        ],
        "prompt": "a photo of a red circle and a green triangle",
    },
]


def test_load_geneval_metadata_roundtrip_and_scoring(tmp_path):
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in GENEVAL_LINES))
    records = load_geneval_metadata(path)
    assert records == GENEVAL_LINES
    img = render(SCENE, 64)  # red circle, blue square (top right), green triangle (bottom left), yellow circle
    results = [score(img, r) for r in records]
    assert [r["correct"] for r in results] == [False, True, True, False, False]
    assert "unknown to this detector" in results[0]["reason"]
    assert results[3]["reason"] == "expected triangle right of square, found triangle below and left of square"
    assert results[4]["reason"] == "expected 1 circle, found 2"


def test_load_geneval_metadata_errors(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(GENEVAL_LINES[0]) + "\n\n" + '{"tag": "counting", "include": [\n')
    with pytest.raises(ValueError, match=rf"{path}:3: invalid JSON"):
        load_geneval_metadata(path)
    path.write_text(json.dumps(GENEVAL_LINES[0]) + "\n" + json.dumps({"tag": "x", "include": {}, "prompt": "p"}))
    with pytest.raises(ValueError, match=rf"{path}:2: 'include'"):
        load_geneval_metadata(path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_geneval_metadata(tmp_path / "missing.jsonl")


# ---------------------------------------------------------------- accuracy on random scenes


def test_bench_ground_truth_is_consistent(load_bench):
    bench = load_bench("verifier_accuracy")
    rng = random.Random(1)
    cases = [bench.random_case(rng) for _ in range(300)]
    assert all(bench.scene_truth(scene, m) == (not violated) for scene, m, violated in cases)
    assert 0.35 < np.mean([v for _, _, v in cases]) < 0.65
    assert {m["tag"] for _, m, _ in cases} == set(bench.TAGS)


@pytest.mark.parametrize("res", [32, 64, 256])
def test_accuracy_on_random_scenes(res, load_bench):
    fig = load_bench("verifier_accuracy").measure(n=300, res=res, condition="clean", seed=res)
    assert fig["object_accuracy"] >= 0.99
    assert fig["correct_agreement"] >= 0.99
    assert 0.3 < fig["true_fraction"] < 0.7  # about half the metadata is deliberately violated


def test_accuracy_under_noise_at_64px(load_bench):
    fig = load_bench("verifier_accuracy").measure(n=150, res=64, condition="noise", seed=3)
    assert fig["object_accuracy"] >= 0.97 and fig["correct_agreement"] >= 0.97
