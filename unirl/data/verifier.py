"""Deterministic GenEval-style verifier: a weight-free shape detector and GenEval's scoring rules.

Detector (:class:`ShapesDetector`, :func:`detect`), no learned weights:

1. Background = per-channel median of a 2-px image border (not assumed white); noise = RMS deviation of the border
   pixels near it. Above ``denoise_sigma`` the image is Gaussian-smoothed (sigma 1 px; linear, so mass is kept).
2. Foreground = RGB distance to the background > ``max(fg_threshold, 4·sqrt(3)·noise)``; 4-connected blobs
   (``scipy.ndimage.label``) under ``min_area_frac`` of the canvas are dropped as noise.
3. Foreground pixels with enough chroma get a hue family (HSV hue bins: red, orange, yellow, green, blue,
   purple). A blob with several *significant* families (>= 12 % of its chromatic pixels and >= the area floor) is
   split, each pixel going to the nearest significant-family pixel: touching objects of different colours become
   separate detections, blur fringes and noise specks do not.
4. Each part is cut at half its own contrast (puts a blurred outline back where it was drawn; holes filled).
   Colour = :func:`classify_color` of the median RGB of its high-contrast core: HSV hue bins for the six chromatic
   names, pink (light red), brown (dark orange), black / white / gray (achromatic). Hue is unchanged by mixing
   with a neutral background, so blurred edges keep their name.
5. Shape from a soft mask (projection of each pixel on the object's colour, over the part grown by ~1 % of the
   canvas, every pixel owned by its nearest part): ``skew`` (largest |skewness| over 8 directions; a symmetric
   blur leaves third cumulants unchanged) > ``SKEW_THRESHOLD`` -> triangle, else ``fill`` (mass / (largest column
   mass x largest row mass): square 1, disc pi/4) > ``FILL_THRESHOLD`` -> square, else circle.

Scoring (:func:`evaluate`, :func:`score`) follows GenEval (djghosh13/geneval ``evaluate_images.py``) in its
"strict" reward variant (Flow-GRPO's reward server, ``evaluate_reward``):

- include clauses are ANDed and counted exactly (``len(found) == count``), exclude clauses ORed
  (``{"class": c, "count": n}`` fails when >= n are found); ``correct`` needs every clause to hold;
- colour: all ``count`` objects of the class must have the colour; position: every object of the clause must stand
  in the relation to every object of the target clause, judged on box centres with a dead zone of
  0.1 x the summed box sizes per axis (GenEval's ``relative_position``); a failed clause leaves no target;
- partial score = mean of the terms: per include clause ``clip(1 - |n_req - n_found| / n_req, 0, 1)``; when the
  count is wrong one 0 for its colour/position; else the colour term ``1 - |n_req - n_colour| / n_req``, and when the
  clause is still matched a position term (1 if every pair holds, else 0; no target: 0).
  Differences from that reward code, on purpose: the count term is clipped at 0 (theirs goes negative for
  over-counts), a failed position adds one 0 (theirs appends 0 and then 1), exclude clauses also decide
  ``correct`` (theirs ignores them), and metadata without include clauses scores ``float(correct)`` (theirs 0).
- classes outside the detector's vocabulary make ``correct`` False with a reason, never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image
from scipy import ndimage

from unirl.data.shapes import RELATIONS, SHAPES

GENEVAL_COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
POSITION_THRESHOLD = 0.1
_FAMILIES: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple")
# Upper hue bound (degrees) of each family; hues >= 330 wrap back to red.
_HUE_EDGES = np.array([20.0, 45.0, 72.0, 165.0, 255.0, 330.0])
_HUE_FAMILY = np.array([0, 1, 2, 3, 4, 5, 0], dtype=np.int8)
# Decision thresholds on (fill, skew), midway between the shapes' values measured on blurred and noisy renders.
FILL_THRESHOLD = 0.91
SKEW_THRESHOLD = 0.17
_DIRECTIONS = np.stack([np.cos(np.arange(8) * np.pi / 8), np.sin(np.arange(8) * np.pi / 8)], axis=1)  # (8, 2)


@dataclass(frozen=True)
class Detection:
    """One detected object. ``box`` is (x0, y0, x1, y1) in pixels, x1/y1 exclusive; ``score`` in [0.5, 1]."""

    cls: str
    color: str
    box: tuple[int, int, int, int]
    area: int
    score: float

    @property
    def center(self) -> tuple[float, float]:
        return ((self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2)


class Detector(Protocol):
    """Anything that turns an image into detections (the Shapes detector, or a real-object detector at full scale)."""

    def __call__(self, image: Image.Image) -> list[Detection]: ...


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Hue in degrees [0, 360), chroma (max - min) and value (max), all on the 0-255 scale; ``rgb`` is (..., 3)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return h * 60.0, c, mx


def _family(hue: np.ndarray) -> np.ndarray:
    return _HUE_FAMILY[np.searchsorted(_HUE_EDGES, hue, side="right")]


def classify_color(rgb: Sequence[float], chroma_threshold: float = 40.0) -> str:
    """Name an RGB colour: a GenEval colour name, or "gray" for a mid achromatic tone.

    >>> [classify_color(c) for c in [(255, 0, 0), (245, 140, 20), (0, 128, 0), (128, 0, 128), (139, 69, 19)]]
    ['red', 'orange', 'green', 'purple', 'brown']
    """
    h, c, v = (float(t) for t in _hsv(np.asarray(rgb, dtype=np.float64)))
    if c < chroma_threshold:
        return "black" if v < 80 else "white" if v > 215 else "gray"
    name = _FAMILIES[int(_family(np.asarray(h)))]
    sat = c / v
    if (h >= 320 or h < 20) and sat < 0.55 and v > 190:
        return "pink"
    if 15 <= h < 45 and v < 165:
        return "brown"
    return name


def shape_features(alpha: np.ndarray) -> tuple[float, float]:
    """(fill, skew) of a soft object mask ``alpha`` (h, w).

    fill = mass / (largest column mass x largest row mass): 1 for an axis-aligned square, pi/4 for a disc, 1/2 for
    a triangle with a horizontal or vertical base; sub-pixel, so antialiased or blurred edges barely move it.
    skew = the largest |skewness| of the mass along 8 directions: about 0.57 for a triangle, 0 for the symmetric
    shapes (third cumulants are unchanged by a symmetric blur).
    """
    mass = max(float(alpha.sum()), 1e-6)
    fill = mass / max(float(alpha.sum(0).max() * alpha.sum(1).max()), 1e-6)
    xs, ys = np.arange(alpha.shape[1], dtype=np.float64), np.arange(alpha.shape[0], dtype=np.float64)
    xs -= alpha.sum(0) @ xs / mass
    ys -= alpha.sum(1) @ ys / mass
    # Central moments mu[p, q] = sum alpha * x^p * y^q / mass for p + q <= 3, then along each direction (c, s):
    # m2 = sum_k C(2,k) c^(2-k) s^k mu[2-k, k], m3 likewise with order 3.
    mu = np.stack([ys**q for q in range(4)]) @ alpha @ np.stack([xs**p for p in range(4)], axis=1) / mass  # (q, p)
    c, s = _DIRECTIONS[:, 0], _DIRECTIONS[:, 1]
    m2 = c**2 * mu[0, 2] + 2 * c * s * mu[1, 1] + s**2 * mu[2, 0]
    m3 = c**3 * mu[0, 3] + 3 * c**2 * s * mu[1, 2] + 3 * c * s**2 * mu[2, 1] + s**3 * mu[3, 0]
    return fill, float(np.max(np.abs(m3) / np.maximum(m2, 1e-6) ** 1.5))


def classify_shape(fill: float, skew: float) -> tuple[str, float]:
    """Shape from :func:`shape_features`: triangle when skewed, else square or circle by fill.

    Confidence in [0.5, 1] grows with the distance to the decision thresholds.
    """
    if skew > SKEW_THRESHOLD:
        return "triangle", 0.5 + 0.5 * min(1.0, (skew - SKEW_THRESHOLD) / SKEW_THRESHOLD)
    margin = min((SKEW_THRESHOLD - skew) / SKEW_THRESHOLD, abs(fill - FILL_THRESHOLD) / (FILL_THRESHOLD - np.pi / 4))
    return ("square" if fill > FILL_THRESHOLD else "circle"), 0.5 + 0.5 * min(1.0, margin)


@dataclass(frozen=True)
class ShapesDetector:
    """The weight-free Shapes-world detector (see the module docstring); ``classes`` is its vocabulary."""

    fg_threshold: float = 60.0
    chroma_threshold: float = 40.0
    min_area_frac: float = 0.004
    denoise_sigma: float = 4.0
    significant_frac: float = 0.12
    classes: tuple[str, ...] = SHAPES

    def __call__(self, image: Image.Image) -> list[Detection]:
        x = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
        H, W = x.shape[:2]
        bg, sigma = _background(x)
        if sigma > self.denoise_sigma:
            x = ndimage.gaussian_filter(x, sigma=(1.0, 1.0, 0.0))
            bg, sigma = _background(x)
        dev = x - bg  # (H, W, 3)
        dist = np.sqrt(dev[..., 0] ** 2 + dev[..., 1] ** 2 + dev[..., 2] ** 2)  # (H, W)
        fg = dist > max(self.fg_threshold, 4.0 * np.sqrt(3.0) * sigma)
        hue, chroma, _ = _hsv(x[fg])  # (N,) over foreground pixels only
        fam = np.full((H, W), -1, dtype=np.int8)
        fam[fg] = np.where(chroma >= self.chroma_threshold, _family(hue), -1)
        min_area = max(4, int(round(self.min_area_frac * H * W)))
        blobs, _ = ndimage.label(fg)
        parts: list[tuple[tuple[slice, slice], np.ndarray]] = []  # (blob slice, single-colour mask in it)
        for i, sl in enumerate(ndimage.find_objects(blobs)):
            blob = blobs[sl] == i + 1
            if blob.sum() >= min_area:
                parts += [(sl, part) for part in self._split(blob, fam[sl], min_area)]
        owner = np.full((H, W), -1 if len(parts) > 1 else 0, dtype=np.int32)  # (H, W) part index
        for k, (sl, part) in enumerate(parts):
            owner[sl][part] = k
        if len(parts) > 1:  # every other pixel goes to the nearest part, so neighbours' blur fringes stay apart
            _, (iy, ix) = ndimage.distance_transform_edt(owner < 0, return_indices=True)
            owner = owner[iy, ix]
        out = [d for k, (sl, p) in enumerate(parts) for d in self._objects(k, sl, p, owner, x, bg, dist, min_area)]
        return sorted(out, key=lambda d: (d.cls, -d.score, d.box))

    def _split(self, blob: np.ndarray, fam: np.ndarray, min_area: int) -> list[np.ndarray]:
        """Split a blob into one mask per significant hue family (one mask when it has at most one)."""
        f = np.where(blob, fam, -1)
        chromatic = f >= 0
        n_chrom = int(chromatic.sum())
        if n_chrom < 0.5 * blob.sum():
            return [blob]  # an achromatic object (black, white, gray)
        counts = np.bincount(f[chromatic], minlength=len(_FAMILIES))
        significant = np.flatnonzero(counts >= max(min_area, self.significant_frac * n_chrom))
        if len(significant) <= 1:
            return [blob]
        seeds = np.isin(f, significant)
        # Every blob pixel takes the family of its nearest seed pixel (fringes, specks, neutral edges).
        _, (iy, ix) = ndimage.distance_transform_edt(~seeds, return_indices=True)
        owner = f[iy, ix]  # (h, w)
        return [blob & (owner == k) for k in significant]

    def _objects(self, k, sl, part, owner, x, bg, dist, min_area: int):
        """Detections in part ``k``: the single-colour mask ``part`` of the blob at slice ``sl``."""
        H, W = owner.shape
        d = dist[sl]
        core = np.percentile(d[part], 90)
        mask = ndimage.binary_fill_holes(part & (d >= 0.5 * core))
        comps, _ = ndimage.label(mask)
        for j, csl in enumerate(ndimage.find_objects(comps)):
            m = comps[csl] == j + 1
            area = int(m.sum())
            if area < min_area:
                continue
            y0, x0 = sl[0].start + csl[0].start, sl[1].start + csl[1].start
            y1, x1 = y0 + m.shape[0], x0 + m.shape[1]
            px, pd = x[y0:y1, x0:x1][m], dist[y0:y1, x0:x1][m]  # (n, 3), (n,)
            rgb = np.median(px[pd >= np.percentile(pd, 75)], axis=0)  # colour of the high-contrast core
            # Soft mass: projection on the object's colour over the mask grown by r px within the pixels nearest
            # to this part (mass-preserving under blur, unbiased under zero-mean noise); r shrinks near the
            # canvas edge so the fringe is cut symmetrically (a one-sided cut fakes skew).
            r = min(max(2, round(0.01 * max(H, W))), y0, x0, H - y1, W - x1)
            wy, wx = slice(max(y0 - r, 0), min(y1 + r, H)), slice(max(x0 - r, 0), min(x1 + r, W))
            grown = np.zeros((wy.stop - wy.start, wx.stop - wx.start), dtype=bool)
            grown[y0 - wy.start : y1 - wy.start, x0 - wx.start : x1 - wx.start] = m
            if r > 0:
                grown = ndimage.binary_dilation(grown, np.ones((3, 3), bool), iterations=r)
            grown &= owner[wy, wx] == k
            c = (rgb - bg) / max(float(np.linalg.norm(rgb - bg)), 1.0)  # unit direction of the object's colour
            proj = np.where(grown, (x[wy, wx] - bg) @ c, 0.0)  # (h, w)
            inner = grown & np.pad(m, ((y0 - wy.start, wy.stop - y1), (x0 - wx.start, wx.stop - x1)))
            plateau = float(np.percentile(proj[inner], 95)) if inner.any() else 1.0
            alpha = proj / max(plateau, 1.0)  # (h, w), 1 on the object's plateau
            shape, conf = classify_shape(*shape_features(alpha))
            yield Detection(shape, classify_color(rgb, self.chroma_threshold), (x0, y0, x1, y1), area, round(conf, 4))


def _background(x: np.ndarray, outlier: float = 60.0) -> tuple[np.ndarray, float]:
    """Background colour (median of a 2-px border) and noise level (RMS deviation of the border pixels within
    ``outlier`` RGB distance of it, so objects touching the border do not count as noise)."""
    border = np.concatenate([x[:2], x[-2:], x[:, :2].transpose(1, 0, 2), x[:, -2:].transpose(1, 0, 2)], axis=1)
    border = border.reshape(-1, 3)  # (N, 3)
    bg = np.median(border, axis=0)
    dev = border - bg  # (N, 3)
    keep = np.linalg.norm(dev, axis=1) < outlier
    return bg, float(np.sqrt(np.mean(dev[keep] ** 2))) if keep.any() else 0.0


DEFAULT_DETECTOR = ShapesDetector()


def detect(image: Image.Image) -> list[Detection]:
    """Detect shapes in ``image`` with the default :class:`ShapesDetector`, sorted by class then confidence."""
    return DEFAULT_DETECTOR(image)


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """GenEval's relations of ``a`` to ``b`` from pixel boxes (centre offset minus ``threshold`` x summed sizes)."""
    boxes = np.array([a.box, b.box], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    dims = (boxes[:, 1] - boxes[:, 0]).sum(axis=0)
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    rels = {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}
    return {k for k, v in rels.items() if v}


def validate_metadata(md: object, where: str = "metadata") -> dict:
    """Check ``md`` against GenEval's schema; raises ValueError naming ``where`` and the bad key."""
    if not isinstance(md, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(md).__name__}")
    for key in ("tag", "prompt"):
        if not isinstance(md.get(key), str):
            raise ValueError(f"{where}: key {key!r} must be a string, got {md.get(key)!r}")
    include, exclude = md.get("include"), md.get("exclude", [])
    if not isinstance(include, list) or not isinstance(exclude, list):
        raise ValueError(f"{where}: 'include' (required) and 'exclude' must be lists of clauses")
    for kind, clauses in (("include", include), ("exclude", exclude)):
        for k, c in enumerate(clauses):
            at = f"{where}: {kind}[{k}]"
            if not isinstance(c, dict) or not isinstance(c.get("class"), str):
                raise ValueError(f"{at} must be an object with a string 'class', got {c!r}")
            if not isinstance(c.get("count"), int) or isinstance(c["count"], bool) or c["count"] < 1:
                raise ValueError(f"{at}.count must be an integer >= 1, got {c.get('count')!r}")
            extra = set(c) - ({"class", "count", "color", "position"} if kind == "include" else {"class", "count"})
            if extra:
                raise ValueError(f"{at} has unknown key(s) {sorted(extra)}")
            if "color" in c and c["color"] not in GENEVAL_COLORS:
                raise ValueError(f"{at}.color must be one of {GENEVAL_COLORS}, got {c['color']!r}")
            if "position" in c:
                p = c["position"]
                ok = isinstance(p, list | tuple) and len(p) == 2 and p[0] in RELATIONS
                if not ok or not isinstance(p[1], int) or not 0 <= p[1] < k:
                    raise ValueError(f"{at}.position must be [relation in {RELATIONS}, index of an earlier clause]")
    return md


def evaluate(
    detections: Sequence[Detection], metadata: dict, classes: Collection[str] | None = SHAPES
) -> dict[str, object]:
    """Score detections against GenEval metadata: ``{"correct", "score", "reason"}`` (rules in the module doc).

    ``classes`` is the detector's vocabulary (None: any class is accepted).
    """
    md = validate_metadata(metadata)
    by_class: dict[str, list[Detection]] = {}
    for det in sorted(detections, key=lambda d: -d.score):
        by_class.setdefault(det.cls, []).append(det)
    reasons: list[str] = []
    if classes is not None:
        unknown = sorted({c["class"] for c in md["include"] + md.get("exclude", [])} - set(classes))
        if unknown:
            names = ", ".join(map(repr, unknown))
            reasons.append(f"class {names} unknown to this detector (it knows {', '.join(classes)})")
    terms: list[float] = []
    groups: list[list[Detection] | None] = []
    for req in md["include"]:
        cls, n = req["class"], req["count"]
        found = by_class.get(cls, [])
        terms.append(min(max(1.0 - abs(n - len(found)) / n, 0.0), 1.0))
        matched = len(found) == n
        if not matched:
            reasons.append(f"expected {n} {cls}, found {len(found)}")
            if "color" in req or "position" in req:
                terms.append(0.0)
        else:
            if "color" in req:
                hits = sum(d.color == req["color"] for d in found)
                terms.append(1.0 - abs(n - hits) / n)
                if hits != n:
                    matched = False
                    seen = ", ".join(d.color for d in found)
                    reasons.append(f"expected {n} {req['color']} {cls}, found {hits} {req['color']} ({seen})")
            if "position" in req and matched:
                rel, target = req["position"]
                if groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {cls} to be {rel}")
                    terms.append(0.0)
                else:
                    pairs = ((a, b) for a in found for b in groups[target])
                    bad = next(((a, b) for a, b in pairs if rel not in relative_position(a, b)), None)
                    terms.append(1.0 if bad is None else 0.0)
                    if bad is not None:
                        matched = False
                        got = " and ".join(sorted(relative_position(*bad))) or "no clear relation to"
                        reasons.append(f"expected {cls} {rel} {bad[1].cls}, found {cls} {got} {bad[1].cls}")
        groups.append(found if matched else None)
    for req in md.get("exclude", []):
        n_found = len(by_class.get(req["class"], []))
        if n_found >= req["count"]:
            reasons.append(f"expected fewer than {req['count']} {req['class']}, found {n_found}")
    correct = not reasons
    return {
        "correct": correct,
        "score": float(np.mean(terms)) if terms else float(correct),
        "reason": reasons[0] if reasons else "ok",
    }


def score(
    image: Image.Image, metadata: dict, detector: Detector = detect, classes: Collection[str] | None = SHAPES
) -> dict[str, object]:
    """Detect objects in ``image`` with ``detector`` and :func:`evaluate` them against GenEval ``metadata``.

    Pass ``classes=None`` (or the detector's own vocabulary) when plugging in another detector.
    """
    return evaluate(detector(image), metadata, classes)


def score_batch(
    images: Sequence[Image.Image],
    metadatas: Sequence[dict],
    detector: Detector = detect,
    classes: Collection[str] | None = SHAPES,
) -> list[dict[str, object]]:
    """:func:`score` for each (image, metadata) pair."""
    if len(images) != len(metadatas):
        raise ValueError(f"score_batch got {len(images)} images but {len(metadatas)} metadata records")
    return [score(im, md, detector, classes) for im, md in zip(images, metadatas)]


def load_geneval_metadata(path: str | Path) -> list[dict]:
    """Read a GenEval ``evaluation_metadata.jsonl`` (one JSON object per line; blank lines skipped).

    Raises ValueError naming the file and line number of a malformed or schema-violating line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GenEval metadata file not found: {path}")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg}); fix or remove this line") from e
            records.append(validate_metadata(obj, where=f"{path}:{lineno}"))
    return records
