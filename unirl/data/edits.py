"""Scene edits in the Shapes world: editing triples (add, remove, recolor, move, resize) and reflection flaws.

Editing triples. A source scene of 1-3 objects, an instruction, the target scene, and the reverse
instruction that maps the target back to the source (for cycle consistency). Every class in an edit scene has
a single colour, so GenEval's colour clauses (which look at the ``count`` first objects of a class) are
unambiguous, and the edited object is the only one of its class, so "the circle" / "the red circle" names it
in both scenes. Targets differ from sources only in the edit: add/remove insert/drop one object (the others
keep their places), recolor/resize change one field of one object, move gives one object a new centre that
puts it clearly in the asked relation to a reference object (of a unique class) while every other object
stays put. ``metadata`` / ``source_metadata`` describe the target / source scene in GenEval's schema: one
include clause per class (count and colour), the moved object's clause carrying the relation to the reference
(the reference clause first, as GenEval), and an exclude clause for the class that add/remove touched (count
+ 1 when present, 1 when gone). Size is not expressible in GenEval's schema, so ``op`` records every edit
structurally (kind, object index, before/after values) for rewards that compare sizes.

Reflection flaws. From a correct scene of a GenEval prompt, a flawed scene that violates exactly one of its
clauses (wrong colour, wrong count, wrong relation, missing object), with the edit instruction that turns the
flawed scene back into the correct one.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from unirl.data.shapes import COLORS, PLURALS, RELATIONS, SHAPES, SIZES, Obj, Scene, place
from unirl.data.t2i_prompts import OPPOSITE, Spec, article, build_scene, noun_phrase

EDIT_TAGS: tuple[str, ...] = ("add", "remove", "recolor", "move", "resize")
# Instruction wording of each relation ("move the square above the triangle") and of each direction.
REL_PHRASE: dict[str, str] = {
    "left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"
}  # fmt: skip
DIRECTION: dict[str, str] = {"left of": "to the left", "right of": "to the right", "above": "up", "below": "down"}
T = TypeVar("T")


@dataclass(frozen=True)
class Edit:
    tag: str
    source: Scene
    target: Scene
    instruction: str
    reverse: str
    op: dict
    source_metadata: dict
    metadata: dict


def retry(fn: Callable[[random.Random], T], rng: random.Random, tries: int = 50) -> T:
    """Call ``fn(rng)`` until it returns without ``RuntimeError`` (an infeasible random draw)."""
    for _ in range(tries):
        try:
            return fn(rng)
        except RuntimeError:
            continue
    raise RuntimeError(f"{getattr(fn, '__name__', fn)} failed {tries} times in a row; the scene grammar is too tight")


def ref(o: Obj, rng: random.Random) -> str:
    """'the circle' or 'the red circle' (the object's class is unique in its scene, so both are unambiguous)."""
    return f"the {o.color} {o.shape}" if rng.random() < 0.5 else f"the {o.shape}"


def scene_metadata(
    scene: Scene, tag: str, prompt: str, position: tuple[str, str, str] | None = None, touched: str | None = None
) -> dict:
    """GenEval metadata describing ``scene`` (classes single-coloured): one include clause per class.

    ``position=(shape, relation, ref_shape)`` adds the relation to the shape's clause (reference clause first);
    ``touched`` adds an exclude clause for that class: ``count + 1`` if present, ``1`` if absent.
    """
    order = list(dict.fromkeys(o.shape for o in scene.objects))
    if position is not None:
        order.remove(position[2])
        order.insert(0, position[2])
    include = []
    for shape in order:
        colors = {o.color for o in scene.objects if o.shape == shape}
        if len(colors) != 1:
            raise ValueError(f"edit scenes need one colour per class; {shape} has {sorted(colors)}")
        clause: dict = {"class": shape, "count": scene.count(shape), "color": colors.pop()}
        if position is not None and shape == position[0]:
            clause["position"] = [position[1], 0]
        include.append(clause)
    meta: dict = {"tag": tag, "include": include}
    if touched is not None:
        meta["exclude"] = [{"class": touched, "count": scene.count(touched) + 1}]
    meta["prompt"] = prompt
    return meta


def _specs(rng: random.Random, n: int, edited: str) -> list[tuple[str, str, str]]:
    """n object specs whose first is of class ``edited`` and unique; classes single-coloured, sizes random."""
    others = [s for s in SHAPES if s != edited]
    classes = [edited] + [rng.choice(others) for _ in range(n - 1)]
    color = {s: rng.choice(COLORS) for s in SHAPES}
    return [(s, color[s], rng.choice(tuple(SIZES))) for s in classes]


def make_edit(tag: str, rng: random.Random) -> Edit:
    """One editing triple of kind ``tag`` (see the module docstring)."""
    builders = {"add": _add_remove, "remove": _add_remove, "recolor": _recolor, "move": _move, "resize": _resize}
    if tag not in builders:
        raise ValueError(f"unknown edit tag {tag!r}; known: {EDIT_TAGS}")
    return retry(lambda r: builders[tag](tag, r), rng)


def _add_remove(tag: str, rng: random.Random) -> Edit:
    x = rng.choice(SHAPES)
    full = place(rng, _specs(rng, rng.randint(2, 3), x))  # object 0 is the one added / removed
    o, rest = full.objects[0], full.objects[1:]
    i = rng.randint(0, len(rest))
    with_o, without = Scene(rest[:i] + (o,) + rest[i:]), Scene(rest)
    add = rng.choice((f"add {article(o.color)} {o.shape}", f"put {article(o.color)} {o.shape} in the picture"))
    remove = rng.choice(("remove {}", "delete {}", "take away {}")).format(ref(o, rng))
    meta_with = scene_metadata(with_o, tag, add, touched=x)
    meta_without = scene_metadata(without, tag, remove, touched=x)
    op = {"op": tag, "index": i, "shape": o.shape, "color": o.color, "size": o.size}
    if tag == "add":
        return Edit(tag, without, with_o, add, remove, op, meta_without, meta_with)
    return Edit(tag, with_o, without, remove, add, op, meta_with, meta_without)


def _edit(
    tag: str,
    src: Scene,
    tgt: Scene,
    instruction: str,
    reverse: str,
    op: dict,
    src_position: tuple[str, str, str] | None = None,
    tgt_position: tuple[str, str, str] | None = None,
) -> Edit:
    """An edit whose metadata describe the scenes: the target's with the instruction, the source's with the reverse."""
    src_meta = scene_metadata(src, tag, reverse, position=src_position)
    return Edit(tag, src, tgt, instruction, reverse, op, src_meta, scene_metadata(tgt, tag, instruction, tgt_position))


def _recolor(tag: str, rng: random.Random) -> Edit:
    src = place(rng, _specs(rng, rng.randint(1, 3), rng.choice(SHAPES)))
    o = src.objects[0]
    new = rng.choice([c for c in COLORS if c != o.color])
    tgt = src.replace_object(0, color=new)
    forms = ("make {r} {c}", "change the colour of {r} to {c}", "turn {r} {c}", "paint {r} {c}")
    form = rng.choice(forms)
    instruction = form.format(r=ref(o, rng), c=new)
    reverse = form.format(r=ref(tgt.objects[0], rng), c=o.color)
    op = {"op": "recolor", "index": 0, "shape": o.shape, "before": o.color, "after": new}
    return _edit(tag, src, tgt, instruction, reverse, op)


def _move(tag: str, rng: random.Random) -> Edit:
    x, y, third = rng.sample(SHAPES, 3)  # moved object, reference object, optional third object: classes unique
    classes = (x, y, third)[: rng.randint(2, 3)]
    specs = [(s, rng.choice(COLORS), rng.choice(tuple(SIZES))) for s in classes]
    directional = rng.random() < 0.5
    new_rel = rng.choice(RELATIONS)
    old_rel = OPPOSITE[new_rel] if directional else rng.choice([r for r in RELATIONS if r != new_rel])
    src = place(rng, specs, relation=(0, old_rel, 1))
    moved = place(rng, [specs[0]], relation=(len(specs) - 1, new_rel, 0), existing=src.objects[1:])
    tgt = Scene((moved.objects[-1],) + src.objects[1:])
    o, r = src.objects[0], src.objects[1]
    if directional:
        instruction = f"move {ref(o, rng)} {DIRECTION[new_rel]}"
        reverse = f"move {ref(tgt.objects[0], rng)} {DIRECTION[old_rel]}"
    else:
        verb = rng.choice(("move", "put"))
        instruction = f"{verb} {ref(o, rng)} {REL_PHRASE[new_rel]} {ref(r, rng)}"
        reverse = f"{verb} {ref(tgt.objects[0], rng)} {REL_PHRASE[old_rel]} {ref(r, rng)}"
    op = {
        "op": "move", "index": 0, "shape": o.shape, "reference": 1, "before": old_rel, "after": new_rel,
        "from": [o.cx, o.cy], "to": [tgt.objects[0].cx, tgt.objects[0].cy],
    }  # fmt: skip
    return _edit(tag, src, tgt, instruction, reverse, op, (x, old_rel, y), (x, new_rel, y))


def _resize(tag: str, rng: random.Random) -> Edit:
    specs = _specs(rng, rng.randint(1, 3), rng.choice(SHAPES))
    specs[0] = (specs[0][0], specs[0][1], "large")  # place the large version: its small version then fits too
    large = place(rng, specs)
    small = large.replace_object(0, size="small")
    grow = rng.random() < 0.5
    src, tgt = (small, large) if grow else (large, small)
    o = src.objects[0]
    bigger = rng.choice(("make {r} bigger", "make {r} larger", "enlarge {r}"))
    smaller = rng.choice(("make {r} smaller", "shrink {r}"))
    up, down = bigger.format(r=ref(o, rng)), smaller.format(r=ref(o, rng))
    instruction, reverse = (up, down) if grow else (down, up)
    op = {"op": "resize", "index": 0, "shape": o.shape, "before": o.size, "after": tgt.objects[0].size}
    return _edit(tag, src, tgt, instruction, reverse, op)


# --------------------------------------------------------------------------------------------- reflection flaws
@dataclass(frozen=True)
class Flaw:
    kind: str  # "wrong colour" | "wrong count" | "wrong relation" | "missing object"
    scene: Scene  # the flawed scene
    instruction: str  # the edit that turns the flawed scene into the correct one
    description: str  # short description of what is wrong


FLAW_KINDS: dict[str, tuple[str, ...]] = {
    "single_object": ("missing object",),
    "two_object": ("missing object",),
    "counting": ("wrong count",),
    "colors": ("wrong colour", "missing object"),
    "position": ("wrong relation",),
    "color_attr": ("wrong colour", "missing object"),
}


def make_flaw(spec: Spec, correct: Scene, rng: random.Random) -> Flaw:
    """A scene violating exactly one clause of ``spec``, obtained from the ``correct`` scene by one edit."""
    kind = rng.choice(FLAW_KINDS[spec.family])
    objs = correct.objects
    if kind == "missing object":
        i = rng.randrange(len(objs))
        o, g = objs[i], spec.groups[i]
        return Flaw(kind, Scene(objs[:i] + objs[i + 1 :]), f"add {noun_phrase(g)}", f"there is no {o.shape}")
    if kind == "wrong colour":
        i = rng.randrange(len(objs))
        o = objs[i]
        bad = rng.choice([c for c in COLORS if c != o.color])
        flawed = correct.replace_object(i, color=bad)
        return Flaw(kind, flawed, f"make the {o.shape} {o.color}", f"the {o.shape} is {bad}")
    if kind == "wrong count":
        g = spec.groups[0]
        if g.count == 1 or (g.count < 4 and rng.random() < 0.5):
            # One object too many: includes still hold, the exclude clause (count + 1) is violated.
            extra = place(rng, [(g.shape, rng.choice(COLORS), rng.choice(tuple(SIZES)))], existing=objs)
            found = f"there are {g.count + 1} {PLURALS[g.shape]}"
            return Flaw(kind, extra, f"remove one {g.shape}", found)
        i = rng.randrange(len(objs))
        n = g.count - 1
        found = f"there {'is' if n == 1 else 'are'} only {n} {g.shape if n == 1 else PLURALS[g.shape]}"
        return Flaw(kind, Scene(objs[:i] + objs[i + 1 :]), f"add one more {g.shape}", found)
    if kind == "wrong relation":
        rel, _ = spec.groups[1].position
        o, r = objs[1], objs[0]
        bad = rng.choice([x for x in RELATIONS if x != rel])
        moved = place(rng, [(o.shape, o.color, o.size)], relation=(1, bad, 0), existing=(r,))
        flawed = Scene((r, moved.objects[1]))
        instruction = f"move the {o.shape} {REL_PHRASE[rel]} the {r.shape}"
        return Flaw(kind, flawed, instruction, f"the {o.shape} is not {rel} the {r.shape}")
    raise ValueError(f"unknown flaw kind {kind!r}")


def flawed_scene(spec: Spec, rng: random.Random) -> tuple[Scene, Flaw]:
    """(correct scene, flaw) for ``spec``, redrawn until the flaw's placement is feasible."""

    def draw(r: random.Random) -> tuple[Scene, Flaw]:
        correct = build_scene(spec, r)
        return correct, make_flaw(spec, correct, r)

    return retry(draw, rng)
