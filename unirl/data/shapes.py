"""The Shapes world: a scene grammar of coloured geometric shapes on a plain canvas.

A :class:`Scene` is resolution-free: object centres and sizes are fractions of the canvas side, so the same
scene renders at 32, 64 or 256 px. Rendering is crisp (no anti-aliasing), with each colour drawn from a
fixed palette whose names are a subset of GenEval's ten colour names that stay distinct at 32 px.

Coordinates: ``x`` grows to the right, ``y`` grows downwards (image convention), as in GenEval's boxes.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace

from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Palette used for rendering; names are GenEval colour names. Values are ordinary RGB for each name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (240, 215, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "purple": (140, 50, 180),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
BACKGROUND: tuple[int, int, int] = (255, 255, 255)
# Object radius (half the bounding-box side) as a fraction of the canvas side, per named size.
SIZES: dict[str, float] = {"small": 0.10, "large": 0.16}
PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles"}
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")


@dataclass(frozen=True)
class Obj:
    """One shape: class, colour name, named size, and centre as fractions of the canvas side."""

    shape: str
    color: str
    size: str
    cx: float
    cy: float

    @property
    def radius(self) -> float:
        return SIZES[self.size]

    def box(self) -> tuple[float, float, float, float]:
        """Normalised bounding box (x0, y0, x1, y1)."""
        r = self.radius
        return (self.cx - r, self.cy - r, self.cx + r, self.cy + r)


@dataclass(frozen=True)
class Scene:
    """An ordered tuple of non-overlapping objects on a plain background."""

    objects: tuple[Obj, ...]

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(tuple(Obj(**o) for o in d["objects"]))

    def count(self, shape: str, color: str | None = None) -> int:
        return sum(o.shape == shape and (color is None or o.color == color) for o in self.objects)

    def replace_object(self, index: int, **changes) -> Scene:
        objs = list(self.objects)
        objs[index] = replace(objs[index], **changes)
        return Scene(tuple(objs))


def render(scene: Scene, resolution: int) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``resolution`` x ``resolution`` pixels."""
    if resolution < 16:
        raise ValueError(f"resolution must be >= 16 px, got {resolution}")
    img = Image.new("RGB", (resolution, resolution), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(draw, o, resolution)
    return img


def _draw(draw: ImageDraw.ImageDraw, o: Obj, res: int) -> None:
    cx, cy, r = o.cx * res, o.cy * res, o.radius * res
    fill = PALETTE[o.color]
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r - 1, cy + r - 1], fill=fill)
    elif o.shape == "square":
        s = r * 0.85  # a little smaller than the box so squares and circles have similar areas
        draw.rectangle([cx - s, cy - s, cx + s - 1, cy + s - 1], fill=fill)
    elif o.shape == "triangle":
        # Upward-pointing isosceles triangle filling the box: apex at top centre, base at the bottom.
        draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r - 1, cy + r - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {o.shape!r}; known: {SHAPES}")


def overlaps(a: Obj, b: Obj, margin: float = 0.03) -> bool:
    """True when the bounding boxes of ``a`` and ``b`` come closer than ``margin`` (canvas fractions)."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return not (ax1 + margin <= bx0 or bx1 + margin <= ax0 or ay1 + margin <= by0 or by1 + margin <= ay0)


def relation_holds(a: Obj, b: Obj, relation: str, threshold: float = 0.1) -> bool:
    """GenEval's rule for "a <relation> b" on box centres, with the margin threshold x the summed box sizes."""
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    off = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    dims = ((ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0))
    revised = [max(abs(o) - threshold * d, 0.0) * math.copysign(1.0, o) for o, d in zip(off, dims)]
    norm = math.hypot(*off)
    if norm < 1e-9 or all(abs(v) < 1e-3 for v in revised):
        return False
    dx, dy = revised[0] / norm, revised[1] / norm
    return {"left of": dx < -0.5, "right of": dx > 0.5, "above": dy < -0.5, "below": dy > 0.5}[relation]


def _in_canvas(o: Obj, pad: float = 0.02) -> bool:
    x0, y0, x1, y1 = o.box()
    return x0 >= pad and y0 >= pad and x1 <= 1 - pad and y1 <= 1 - pad


def place(
    rng: random.Random,
    specs: list[tuple[str, str, str]],
    relation: tuple[int, str, int] | None = None,
    existing: tuple[Obj, ...] = (),
    tries: int = 2000,
) -> Scene:
    """Place objects ``specs`` = [(shape, color, size), ...] at random, without overlap.

    ``relation=(i, rel, j)`` additionally requires object i to stand in GenEval relation ``rel`` to object j
    (indices into the final object list, ``existing`` first). Raises ``RuntimeError`` when no placement is found.
    """
    for _ in range(tries // 50):
        objs = list(existing)
        ok = True
        for shape, color, size in specs:
            r = SIZES[size]
            for _ in range(50):
                o = Obj(shape, color, size, rng.uniform(r + 0.02, 1 - r - 0.02), rng.uniform(r + 0.02, 1 - r - 0.02))
                if _in_canvas(o) and not any(overlaps(o, p) for p in objs):
                    objs.append(o)
                    break
            else:
                ok = False
                break
        if not ok:
            continue
        if relation is not None:
            i, rel, j = relation
            if not _robust_relation(objs[i], objs[j], rel):
                continue
        return Scene(tuple(objs))
    raise RuntimeError(f"could not place {specs} (relation={relation}) without overlap in {tries} tries")


def _robust_relation(a: Obj, b: Obj, rel: str) -> bool:
    """The relation holds, and clearly: no other relation of the four holds along the other axis."""
    if not relation_holds(a, b, rel):
        return False
    others = [r for r in RELATIONS if r != rel]
    return not any(relation_holds(a, b, r) for r in others)


def random_spec(rng: random.Random, shape: str | None = None, color: str | None = None, size: str | None = None):
    """A (shape, color, size) triple with the given parts fixed and the rest drawn uniformly."""
    return (shape or rng.choice(SHAPES), color or rng.choice(COLORS), size or rng.choice(tuple(SIZES)))
