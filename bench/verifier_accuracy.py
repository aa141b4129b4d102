"""Verifier accuracy and speed on random Shapes scenes with known ground truth.

For each resolution (32, 64, 256 px) and image condition (clean render, Gaussian blur, Gaussian noise + blur) it
draws ``--n`` random cases: a scene of 1-4 objects built for one GenEval task family (single object, two objects,
counting, colours, position, colour attribution) with metadata in GenEval's schema, half of them deliberately
violated (wrong count, wrong colour, opposite relation, absent class, an exclude clause that is present). Ground
truth comes from the scene itself (object attributes and ``shapes.relation_holds``), never from the detector.

Figures: per-object detection accuracy = TP / (ground-truth objects + false positives), a TP being a detection of
the right class and colour with IoU >= 0.5 to an unmatched ground-truth box; ``correct`` agreement with ground
truth; verifier throughput (detect + evaluate, scenes/s). The last printed line is one JSON object.

    python bench/verifier_accuracy.py --n 2000
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unirl.data.shapes import COLORS, RELATIONS, SHAPES, Scene, place, relation_holds, render  # noqa: E402
from unirl.data.verifier import Detection, detect, evaluate  # noqa: E402

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
CONDITIONS = ("clean", "blur", "noise")


def _spec(rng: random.Random, shape: str, color: str | None = None) -> tuple[str, str, str]:
    return (shape, color or rng.choice(COLORS), rng.choice(("small", "large")))


def random_case(rng: random.Random) -> tuple[Scene, dict, bool]:
    """(scene, metadata, violated): a scene built for a random GenEval tag with metadata true for it by
    construction, broken in one random way (so false) with probability 1/2."""
    tag = rng.choice(TAGS)
    a, b, c = rng.sample(SHAPES, 3)
    relation = None
    if tag == "single_object":
        specs = [_spec(rng, a)]
        include = [{"class": a, "count": 1}]
    elif tag == "two_object":
        specs = [_spec(rng, a), _spec(rng, b)]
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
    elif tag == "counting":
        n = rng.randint(1, 4)
        specs = [_spec(rng, a) for _ in range(n)]
        include = [{"class": a, "count": n}]
    elif tag == "colors":
        specs = [_spec(rng, a)]
        include = [{"class": a, "count": 1, "color": specs[0][1]}]
    elif tag == "position":
        rel = rng.choice(RELATIONS)
        specs, relation = [_spec(rng, b), _spec(rng, a)], (1, rel, 0)
        include = [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [rel, 0]}]
    else:  # color_attr
        ca, cb = rng.sample(COLORS, 2)
        specs = [_spec(rng, a, ca), _spec(rng, b, cb)]
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
    used = {s[0] for s in specs}
    others = [s for s in SHAPES if s not in used] or [c]
    specs += [_spec(rng, rng.choice(others)) for _ in range(rng.randint(0, 4 - len(specs)))]
    md = {"tag": tag, "include": include, "prompt": f"{tag} case"}
    if tag == "counting":
        md["exclude"] = [{"class": a, "count": include[0]["count"] + 1}]
    scene = place(rng, specs, relation=relation)
    violated = rng.random() < 0.5
    if violated:
        _violate(rng, scene, md)
    return scene, md, violated


def _violate(rng: random.Random, scene: Scene, md: dict) -> None:
    """Break ``md`` in place in one random applicable way."""
    inc = md["include"]
    kinds = ["count", "exclude"] + (["color"] * any("color" in r for r in inc))
    kinds += ["relation"] * any("position" in r for r in inc)
    kinds += ["class"] * any(scene.count(s) == 0 for s in SHAPES)
    kind = rng.choice(kinds)
    if kind == "count":
        req = rng.choice(inc)
        req["count"] = req["count"] + 1 if req["count"] == 1 or rng.random() < 0.5 else req["count"] - 1
        if "exclude" in md:
            md["exclude"] = [{"class": req["class"], "count": req["count"] + 1}]
    elif kind == "exclude":
        present = [o.shape for o in scene.objects]
        cls = rng.choice(present)
        md.setdefault("exclude", []).append({"class": cls, "count": rng.randint(1, present.count(cls))})
    elif kind == "color":
        req = rng.choice([r for r in inc if "color" in r])
        req["color"] = rng.choice([k for k in COLORS if k != req["color"]])
    elif kind == "relation":
        req = next(r for r in inc if "position" in r)
        req["position"] = [OPPOSITE[req["position"][0]], req["position"][1]]
    else:
        rng.choice(inc)["class"] = rng.choice([s for s in SHAPES if scene.count(s) == 0])


def scene_truth(scene: Scene, md: dict) -> bool:
    """GenEval's strict rule evaluated on the scene's own objects (independent of any detector)."""
    groups: list[list | None] = []
    ok = True
    for req in md["include"]:
        objs = [o for o in scene.objects if o.shape == req["class"]]
        m = len(objs) == req["count"]
        if m and "color" in req:
            m = all(o.color == req["color"] for o in objs)
        if m and "position" in req:
            rel, t = req["position"]
            m = groups[t] is not None and all(relation_holds(o, p, rel) for o in objs for p in groups[t])
        groups.append(objs if m else None)
        ok &= m
    return ok and all(scene.count(r["class"]) < r["count"] for r in md.get("exclude", []))


def degrade(image: Image.Image, condition: str, rng: np.random.Generator) -> Image.Image:
    """clean: as rendered; blur: Gaussian blur (radius 0.7 px); noise: N(0, 15) per channel + blur (radius 0.5)."""
    if condition == "clean":
        return image
    if condition == "blur":
        return image.filter(ImageFilter.GaussianBlur(0.7))
    x = np.asarray(image.filter(ImageFilter.GaussianBlur(0.5)), dtype=np.float32)  # (H, W, 3)
    x = x + rng.normal(0.0, 15.0, x.shape)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def match_objects(scene: Scene, dets: list[Detection], res: int) -> tuple[int, int, int]:
    """(true positives, ground-truth objects, detections): same class + colour and IoU >= 0.5, one to one."""
    used: set[int] = set()
    tp = 0
    for o in scene.objects:
        g = np.array(o.box()) * res
        for k, d in enumerate(dets):
            if k in used or d.cls != o.shape or d.color != o.color:
                continue
            ix = max(0.0, min(g[2], d.box[2]) - max(g[0], d.box[0]))
            iy = max(0.0, min(g[3], d.box[3]) - max(g[1], d.box[1]))
            inter = ix * iy
            union = (g[2] - g[0]) * (g[3] - g[1]) + (d.box[2] - d.box[0]) * (d.box[3] - d.box[1]) - inter
            if inter / union >= 0.5:
                used.add(k)
                tp += 1
                break
    return tp, len(scene.objects), len(dets)


def measure(n: int, res: int, condition: str = "clean", seed: int = 0) -> dict:
    """Accuracy figures and throughput over ``n`` random cases at ``res`` px under ``condition``."""
    rng, nrng = random.Random(seed), np.random.default_rng(seed)
    tp = gt = nd = agree = n_true = 0
    elapsed = 0.0
    for _ in range(n):
        scene, md, _ = random_case(rng)
        image = degrade(render(scene, res), condition, nrng)
        t0 = time.perf_counter()
        dets = detect(image)
        result = evaluate(dets, md)
        elapsed += time.perf_counter() - t0
        truth = scene_truth(scene, md)
        a, b, c = match_objects(scene, dets, res)
        tp, gt, nd = tp + a, gt + b, nd + c
        agree += result["correct"] == truth
        n_true += truth
    return {
        "res": res,
        "condition": condition,
        "n": n,
        "object_accuracy": tp / (gt + nd - tp),
        "correct_agreement": agree / n,
        "true_fraction": n_true / n,
        "scenes_per_s": n / elapsed,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="cases per resolution and condition")
    ap.add_argument("--res", type=int, nargs="+", default=[32, 64, 256], help="resolutions in px")
    ap.add_argument("--conditions", nargs="+", default=list(CONDITIONS), choices=CONDITIONS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = [measure(args.n, r, cond, args.seed) for r in args.res for cond in args.conditions]
    print(f"{'res':>4} {'condition':>9} {'n':>6} {'obj acc':>8} {'agree':>7} {'true %':>7} {'scenes/s':>9}")
    for r in rows:
        print(
            f"{r['res']:>4} {r['condition']:>9} {r['n']:>6} {r['object_accuracy']:>8.4f}"
            f" {r['correct_agreement']:>7.4f} {r['true_fraction']:>7.3f} {r['scenes_per_s']:>9.0f}"
        )
    print(json.dumps({"bench": "verifier_accuracy", "rows": rows}))


if __name__ == "__main__":
    main()
