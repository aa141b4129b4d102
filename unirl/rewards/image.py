"""Image rewards for the DM side, registered by name: verifier, editing, cycle consistency, JPEG, CLIP.

Every function has the registry's signature ``(samples, prompts, metadata) -> list[float]``; ``samples`` are PIL
images. ``metadata[i]`` is either GenEval metadata itself (``include``/``exclude``) or a shard meta carrying it
under ``"metadata"`` (the scenarios pass shard metas).

- ``geneval``: the verifier's partial score (:func:`unirl.data.verifier.score`, GenEval's rules), in [0, 1].
- ``geneval_correct``: the verifier's binary ``correct`` as 0.0 / 1.0.
- ``geneval_complete``: the partial score, 0 when a requested class is absent (no credit for leaving objects out).
- ``edit_correctness``: mean of (a) the verifier partial score of the edited image against the TARGET metadata
  (every class with its count and colour, the moved object's relation), (a') for add/remove, 1.0 when the
  target's exclude clause holds (no extra / no leftover object of the touched class; the partial score ignores
  exclude clauses), (b) preservation: the share of untouched target objects (all but the edited one, from
  ``meta["scene"]`` and ``meta["edit"]``) found by the verifier with their class and colour within 0.15 of the
  canvas side of their place, when there are any, and (c) for ``resize`` only, 1.0 when the edited object's
  detected box side is on the asked side of the midpoint between the small and large sizes. In [0, 1].
- ``cycle_consistency``: the reverse edit should give back the source: ``samples`` are the reconstructions,
  ``metadata[i]["source_image"]`` the source; PSNR (8 bit) mapped linearly from [10, 40] dB to [0, 1], clipped.
- ``jpeg_compressibility``: Flow-GRPO's: ``-(JPEG size at quality 95 in kB) / 500`` (higher = more compressible).
- ``clip_similarity``: cosine similarity of a local ``CLIPModel``'s image and text embeddings, in [-1, 1]. The
  model directory (``CLIPModel`` + its tokenizer, ``save_pretrained`` layout) is set with
  ``configure("clip_similarity", model_path=...)`` (``rl.reward_kwargs`` in ``params.yaml``); nothing is fetched
  from a hub. Images are preprocessed without a processor: bicubic resize to the vision tower's ``image_size`` and
  CLIP's mean/std normalisation.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from unirl.data import verifier
from unirl.data.shapes import SIZES
from unirl.rewards.registry import register

__all__ = [
    "clip_similarity",
    "configure",
    "cycle_consistency",
    "edit_correctness",
    "edit_terms",
    "geneval",
    "geneval_complete",
    "geneval_correct",
    "jpeg_compressibility",
    "psnr",
]

OPTIONS: dict[str, dict[str, Any]] = {}
PRESERVE_TOL = 0.15  # max centre offset of an untouched object, as a fraction of the canvas side
PSNR_RANGE = (10.0, 40.0)  # dB mapped to [0, 1] by cycle_consistency
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def configure(name: str, **options: Any) -> None:
    """Set options of a configurable reward (e.g. ``configure("clip_similarity", model_path="...")``)."""
    known = {"clip_similarity": {"model_path", "device"}}
    if name not in known:
        raise ValueError(f"reward {name!r} takes no options; configurable rewards: {sorted(known)}")
    unknown = set(options) - known[name]
    if unknown:
        raise ValueError(f"reward {name!r}: unknown option(s) {sorted(unknown)}; known: {sorted(known[name])}")
    OPTIONS[name] = dict(options)


def _geneval_md(meta: Mapping[str, Any], i: int) -> dict:
    if "include" in meta:
        return dict(meta)
    if "metadata" in meta:
        return meta["metadata"]
    raise ValueError(f"metadata[{i}] has neither GenEval 'include' clauses nor a 'metadata' entry")


@register("geneval")
def geneval(samples: Sequence[Image.Image], prompts: Sequence[str],
            metadata: Sequence[Mapping[str, Any]]) -> list[float]:
    """The verifier's GenEval partial score of each image against its metadata.

    >>> from unirl.data.shapes import Obj, Scene, render
    >>> img = render(Scene((Obj("circle", "red", "large", 0.5, 0.5),)), 64)
    >>> md = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a circle"}
    >>> geneval([img], ["a circle"], [md])
    [1.0]
    >>> geneval([img], ["two squares"], [{"metadata": {**md, "include": [{"class": "square", "count": 2}]}}])
    [0.0]
    """
    return [float(verifier.score(im, _geneval_md(m, i))["score"]) for i, (im, m) in enumerate(zip(samples, metadata))]


@register("geneval_correct")
def geneval_correct(samples: Sequence[Image.Image], prompts: Sequence[str],
                    metadata: Sequence[Mapping[str, Any]]) -> list[float]:
    """1.0 when the verifier judges the image correct for its metadata (GenEval's binary score), else 0.0.

    >>> from unirl.data.shapes import Obj, Scene, render
    >>> img = render(Scene((Obj("square", "blue", "large", 0.3, 0.5), Obj("circle", "red", "small", 0.7, 0.5))), 64)
    >>> md = {"tag": "position", "include": [{"class": "circle", "count": 1},
    ...       {"class": "square", "count": 1, "position": ["left of", 0]}], "prompt": "a square left of a circle"}
    >>> geneval_correct([img], [md["prompt"]], [md])
    [1.0]
    """
    return [float(bool(verifier.score(im, _geneval_md(m, i))["correct"]))
            for i, (im, m) in enumerate(zip(samples, metadata))]


@register("geneval_complete")
def geneval_complete(samples: Sequence[Image.Image], prompts: Sequence[str],
                     metadata: Sequence[Mapping[str, Any]]) -> list[float]:
    """The GenEval partial score, but 0 when a requested object class is missing from the image altogether.

    The partial score gives each include clause its own terms, so an image that leaves out one of two requested
    objects keeps half the credit (a lone red triangle for "a red triangle and a blue circle" scores 0.5). Where the
    generator draws two-object and position scenes badly, that beats attempting them, and a policy that chooses
    the generator's text learns to drop objects: ``prompt_refine`` under ``geneval`` (600 steps, lr 5e-5) rewrote
    "draw a triangle and also a circle" as "a photo of a triangle" (docs/results.md). Here every requested class
    must be seen at least once before any credit, so omission scores 0; wrong counts, colours and positions of
    objects that are there keep their partial terms.

    >>> from unirl.data.shapes import Obj, Scene, render
    >>> img = render(Scene((Obj("triangle", "red", "large", 0.5, 0.5),)), 64)
    >>> both = {"tag": "two_object", "include": [{"class": "triangle", "count": 1}, {"class": "circle", "count": 1}],
    ...         "prompt": "a triangle and a circle"}
    >>> geneval([img], [both["prompt"]], [both]), geneval_complete([img], [both["prompt"]], [both])
    ([0.5], [0.0])
    >>> three = {"tag": "counting", "include": [{"class": "triangle", "count": 3}], "prompt": "three triangles"}
    >>> [round(r, 3) for r in geneval_complete([img], [three["prompt"]], [three])]  # present, wrong count
    [0.333]
    """
    out = []
    for i, (im, m) in enumerate(zip(samples, metadata)):
        md = _geneval_md(m, i)
        detections = verifier.detect(im)
        partial = float(verifier.evaluate(detections, md)["score"])  # validates md (a clear error when malformed)
        seen = {d.cls for d in detections}
        out.append(partial if all(req["class"] in seen for req in md["include"]) else 0.0)
    return out


def edit_terms(image: Image.Image, meta: Mapping[str, Any]) -> dict[str, float]:
    """Terms of :func:`edit_correctness` for one edited image: ``target`` and, where they apply, ``exclude``,
    ``preserve``, ``size``."""
    for key in ("metadata", "scene", "edit"):
        if key not in meta:
            raise ValueError(f"edit_correctness needs the edit shard meta; key {key!r} is missing")
    res = image.size[0]
    dets = verifier.detect(image)
    md = meta["metadata"]
    terms = {"target": float(verifier.evaluate(dets, md)["score"])}
    if md.get("exclude"):  # the partial score ignores exclude clauses; add/remove are judged by them
        terms["exclude"] = float(all(sum(d.cls == c["class"] for d in dets) < c["count"] for c in md["exclude"]))
    op = meta["edit"]
    objects = meta["scene"]["objects"]
    edited = None if op["op"] == "remove" else int(op["index"])
    untouched = [o for j, o in enumerate(objects) if j != edited]
    if untouched:
        found = 0
        for o in untouched:
            cx, cy = o["cx"] * res, o["cy"] * res
            found += any(d.cls == o["shape"] and d.color == o["color"]
                         and math.hypot(d.center[0] - cx, d.center[1] - cy) <= PRESERVE_TOL * res for d in dets)
        terms["preserve"] = found / len(untouched)
    if op["op"] == "resize":
        mine = [d for d in dets if d.cls == op["shape"]]
        mid = (SIZES["small"] + SIZES["large"]) * res  # midpoint of the two box sides (2 r)
        side = max((max(d.box[2] - d.box[0], d.box[3] - d.box[1]) for d in mine), default=None)
        ok = side is not None and ((side > mid) == (op["after"] == "large"))
        terms["size"] = float(ok)
    return terms


@register("edit_correctness")
def edit_correctness(samples: Sequence[Image.Image], prompts: Sequence[str],
                     metadata: Sequence[Mapping[str, Any]]) -> list[float]:
    """Edit verifier: mean of the target score, the preservation share and (resize) the size check; in [0, 1].

    >>> from unirl.data.shapes import Obj, Scene, render
    >>> tgt = Scene((Obj("circle", "blue", "large", 0.3, 0.5), Obj("square", "green", "large", 0.7, 0.5)))
    >>> meta = {"scene": tgt.to_dict(), "edit": {"op": "recolor", "index": 0, "shape": "circle"},
    ...         "metadata": {"tag": "recolor", "prompt": "make the circle blue", "include": [
    ...             {"class": "circle", "count": 1, "color": "blue"},
    ...             {"class": "square", "count": 1, "color": "green"}]}}
    >>> edit_correctness([render(tgt, 64)], ["make the circle blue"], [meta])
    [1.0]
    >>> src = Scene((Obj("circle", "red", "large", 0.3, 0.5), Obj("square", "green", "large", 0.7, 0.5)))
    >>> edit_correctness([render(src, 64)], ["make the circle blue"], [meta])  # target 3/4 (colour), preserved 1
    [0.875]
    """
    return [float(np.mean(list(edit_terms(im, m).values()))) for im, m in zip(samples, metadata)]


def psnr(a: Image.Image, b: Image.Image) -> float:
    """PSNR in dB between two 8-bit RGB images of the same size (inf when identical)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64)
    y = np.asarray(b.convert("RGB").resize(a.size, Image.Resampling.BICUBIC), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


@register("cycle_consistency")
def cycle_consistency(samples: Sequence[Image.Image], prompts: Sequence[str],
                      metadata: Sequence[Mapping[str, Any]]) -> list[float]:
    """PSNR of the reconstruction (sample) vs ``metadata[i]["source_image"]``, mapped [10, 40] dB -> [0, 1].

    >>> a = Image.new("RGB", (8, 8), (200, 10, 10))
    >>> b = Image.new("RGB", (8, 8), (210, 10, 10))  # MSE 100/3: PSNR 32.9 dB
    >>> [round(v, 3) for v in cycle_consistency([a, b], ["", ""], [{"source_image": a}] * 2)]
    [1.0, 0.763]
    """
    lo, hi = PSNR_RANGE
    out = []
    for i, (im, m) in enumerate(zip(samples, metadata)):
        if "source_image" not in m:
            raise ValueError(f"metadata[{i}] has no 'source_image' (the image the reverse edit should reconstruct)")
        p = psnr(m["source_image"], im)
        out.append(1.0 if math.isinf(p) else min(max((p - lo) / (hi - lo), 0.0), 1.0))
    return out


@register("jpeg_compressibility")
def jpeg_compressibility(samples: Sequence[Image.Image], prompts: Sequence[str],
                         metadata: Sequence[Mapping[str, Any]]) -> list[float]:
    """Flow-GRPO's JPEG compressibility: ``-kB / 500`` of the image saved as JPEG at quality 95.

    >>> flat, noisy = Image.new("RGB", (64, 64), (90, 90, 90)), Image.effect_noise((64, 64), 80).convert("RGB")
    >>> a, b = jpeg_compressibility([flat, noisy], ["", ""], [{}, {}])
    >>> a > b, -0.01 < a < 0
    (True, True)
    """
    out = []
    for im in samples:
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        out.append(-(buf.tell() / 1000) / 500)
    return out


@functools.lru_cache(maxsize=2)
def _load_clip(path: str, device: str) -> tuple[Any, Any]:
    from transformers import AutoTokenizer, CLIPModel

    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"clip_similarity: no CLIPModel at {p} (config.json missing); save one there with save_pretrained "
            "(model + tokenizer) and set rl.reward_kwargs.clip_similarity.model_path")
    model = CLIPModel.from_pretrained(p).to(device).eval()
    return model, AutoTokenizer.from_pretrained(p)


def _clip_pixels(images: Sequence[Image.Image], size: int) -> Any:
    import torch

    arr = np.stack([np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
                    for im in images]) / 255.0  # (B, H, W, 3)
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)  # (B, 3, H, W)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (x - mean) / std


@register("clip_similarity")
def clip_similarity(samples: Sequence[Image.Image], prompts: Sequence[str],
                    metadata: Sequence[Mapping[str, Any]]) -> list[float]:
    """Cosine similarity of CLIP image and prompt embeddings (model from ``configure(..., model_path=...)``)."""
    import torch

    opts = OPTIONS.get("clip_similarity", {})
    if "model_path" not in opts:
        raise ValueError("clip_similarity needs a local CLIP directory: configure('clip_similarity', model_path=...) "
                         "(rl.reward_kwargs.clip_similarity.model_path in params.yaml)")
    device = str(opts.get("device", "cpu"))
    model, tok = _load_clip(str(opts["model_path"]), device)
    pixels = _clip_pixels(samples, model.config.vision_config.image_size).to(device)
    max_len = model.config.text_config.max_position_embeddings
    text = tok(list(prompts), padding=True, truncation=True, max_length=max_len, return_tensors="pt").to(device)
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixels)
        txt = model.get_text_features(input_ids=text["input_ids"], attention_mask=text["attention_mask"])
    img = img if isinstance(img, torch.Tensor) else img.pooler_output
    txt = txt if isinstance(txt, torch.Tensor) else txt.pooler_output
    return torch.nn.functional.cosine_similarity(img.float(), txt.float(), dim=-1).tolist()
