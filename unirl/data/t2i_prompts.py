"""GenEval's six text-to-image task families over the Shapes world: specs, scenes, phrasings and metadata.

A :class:`Spec` is the structured content of one prompt: a family tag and its object groups in GenEval's
``include`` order (for ``position`` the reference object comes first, as in GenEval's metadata file). From a
spec come

- the scene (:func:`build_scene`): exactly the objects the prompt names and nothing else, sizes random and
  colours random where the prompt leaves them open; ``position`` scenes hold the relation clearly
  (:func:`unirl.data.shapes.place` with ``relation``);
- the prompt (:func:`phrase`): GenEval-style text with several prefixes ("a photo of", "an image of", ...),
  number words or digits and relation synonyms drawn from the rng, or the canonical GenEval wording when no
  rng is given (used for rewrites and explicit prompts);
- a casual user request (:func:`casual_phrase`) for prompt refinement;
- GenEval-schema metadata (:meth:`Spec.metadata`), with counting's ``exclude`` clause for ``count + 1``.

:func:`violations` evaluates GenEval's rules on a ground-truth scene (no detector): include clauses need at
least ``count`` objects of the class (of the colour, when given) and the relation to every object of the
referenced group; exclude clauses fail when ``count`` or more objects of the class are present.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from unirl.data.shapes import COLORS, NUMBER_WORDS, PLURALS, RELATIONS, SHAPES, SIZES, Scene, place, relation_holds

FAMILIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MAX_COUNT = 4
PREFIXES: tuple[str, ...] = (
    "a photo of {}", "an image of {}", "a picture showing {}", "a drawing of {}", "a picture of {}",
    "an illustration of {}", "a simple drawing of {}", "a canvas with {}",
)  # fmt: skip
# Prompt wordings of each GenEval relation; the first one is GenEval's own.
RELATION_WORDS: dict[str, tuple[str, ...]] = {
    "left of": ("left of", "to the left of"),
    "right of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under"),
}
OPPOSITE: dict[str, str] = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Descriptions that identify each shape by its geometry (used by casual and reasoning prompts).
SHAPE_PROPERTIES: dict[str, tuple[str, ...]] = {
    "circle": ("with no corners", "that is perfectly round", "with no straight sides"),
    "square": ("with four equal sides", "with four corners", "with four right angles"),
    "triangle": ("with three corners", "with three sides", "with three angles"),
}
CORNERS: dict[str, int] = {"circle": 0, "square": 4, "triangle": 3}


@dataclass(frozen=True)
class Group:
    """One include clause: ``count`` objects of ``shape``, optionally coloured and related to another group."""

    shape: str
    count: int = 1
    color: str | None = None
    position: tuple[str, int] | None = None  # (GenEval relation, index of the reference group)


@dataclass(frozen=True)
class Spec:
    """The structured content of a GenEval-style prompt: family tag and groups in GenEval include order."""

    family: str
    groups: tuple[Group, ...]

    def metadata(self, prompt: str, tag: str | None = None) -> dict:
        """GenEval-schema metadata; counting adds GenEval's ``exclude`` clause for ``count + 1``."""
        include = []
        for g in self.groups:
            clause: dict = {"class": g.shape, "count": g.count}
            if g.color is not None:
                clause["color"] = g.color
            if g.position is not None:
                clause["position"] = [g.position[0], g.position[1]]
            include.append(clause)
        meta: dict = {"tag": tag or self.family, "include": include}
        if self.family == "counting":
            meta["exclude"] = [{"class": g.shape, "count": g.count + 1} for g in self.groups]
        meta["prompt"] = prompt
        return meta


def article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def noun_phrase(g: Group, rng: random.Random | None = None, counting: bool = False) -> str:
    """'a red circle', 'three squares' / '3 squares' (digits only with an rng), 'one triangle' when counting."""
    words = ([g.color] if g.color else []) + [g.shape if g.count == 1 else PLURALS[g.shape]]
    if g.count == 1 and not counting:
        return article(" ".join(words))
    number = str(g.count) if rng is not None and rng.random() < 0.3 else NUMBER_WORDS[g.count]
    return f"{number} {' '.join(words)}"


def body(spec: Spec, rng: random.Random | None = None) -> str:
    """The object description of a prompt, without prefix: 'a circle left of a square'."""
    gs = spec.groups
    counting = spec.family == "counting"
    if spec.family == "position":
        rel, ref = gs[1].position
        words = RELATION_WORDS[rel]
        rel_word = rng.choice(words) if rng is not None else words[0]
        return f"{noun_phrase(gs[1], rng)} {rel_word} {noun_phrase(gs[ref], rng)}"
    return " and ".join(noun_phrase(g, rng, counting) for g in gs)


def phrase(spec: Spec, rng: random.Random | None = None) -> str:
    """A GenEval-style prompt: canonical 'a photo of ...' without an rng, a random phrasing with one."""
    prefix = rng.choice(PREFIXES) if rng is not None else PREFIXES[0]
    return prefix.format(body(spec, rng))


def sample_spec(family: str, rng: random.Random) -> Spec:
    """Draw the content of one prompt of ``family`` (two-object families use two different classes)."""
    if family == "single_object":
        return Spec(family, (Group(rng.choice(SHAPES)),))
    if family == "two_object":
        a, b = rng.sample(SHAPES, 2)
        return Spec(family, (Group(a), Group(b)))
    if family == "counting":
        return Spec(family, (Group(rng.choice(SHAPES), rng.randint(1, MAX_COUNT)),))
    if family == "colors":
        return Spec(family, (Group(rng.choice(SHAPES), color=rng.choice(COLORS)),))
    if family == "position":
        obj, ref = rng.sample(SHAPES, 2)
        return Spec(family, (Group(ref), Group(obj, position=(rng.choice(RELATIONS), 0))))
    if family == "color_attr":
        (a, b), (ca, cb) = rng.sample(SHAPES, 2), rng.sample(COLORS, 2)
        return Spec(family, (Group(a, color=ca), Group(b, color=cb)))
    raise ValueError(f"unknown t2i family {family!r}; known: {FAMILIES}")


def build_scene(spec: Spec, rng: random.Random) -> Scene:
    """Exactly the objects of ``spec`` (group order), sizes random, colours random where not specified."""
    specs, relation = [], None
    for g in spec.groups:
        if g.position is not None:
            relation = (len(specs), g.position[0], g.position[1])
        specs += [(g.shape, g.color or rng.choice(COLORS), rng.choice(tuple(SIZES))) for _ in range(g.count)]
    return place(rng, specs, relation=relation)


def casual_phrase(spec: Spec, rng: random.Random) -> str:
    """A vague, conversational request whose explicit rewrite is ``phrase(spec)``."""
    gs, fam = spec.groups, spec.family
    if fam == "single_object":
        s, prop = gs[0].shape, rng.choice(SHAPE_PROPERTIES[gs[0].shape])
        return rng.choice(
            (f"draw me {article(s)}", f"can you make a picture with {article(s)} in it?",
             f"I want to see {article(s)}", f"just {article(s)} please", f"I want a shape {prop}")
        )  # fmt: skip
    if fam == "two_object":
        a, b = gs[0].shape, gs[1].shape
        return rng.choice(
            (f"draw {article(a)} and also {article(b)}", f"I'd like {article(a)} together with {article(b)}",
             f"put {article(a)} and {article(b)} in the picture", f"{a} plus {b}, one of each")
        )  # fmt: skip
    if fam == "counting":
        s, n = gs[0].shape, gs[0].count
        if n == 1:
            return rng.choice((f"draw me a single {s}", f"just one {s}, no more", f"only one {s} please"))
        num, pl = rng.choice((NUMBER_WORDS[n], str(n))), PLURALS[s]
        return rng.choice(
            (f"draw me some {pl}, {num} of them", f"I need {num} {pl}", f"give me exactly {num} {pl}",
             f"how about {num} {pl}?")
        )  # fmt: skip
    if fam == "colors":
        s, c = gs[0].shape, gs[0].color
        prop = rng.choice(SHAPE_PROPERTIES[s])
        return rng.choice(
            (f"I want a {c} thing {prop}", f"make {article(s)}, colour it {c}", f"{article(s)} please, in {c}",
             f"something {c} {prop}")
        )  # fmt: skip
    if fam == "position":
        rel, _ = gs[1].position
        a, b = gs[1].shape, gs[0].shape
        options = {
            "left of": (f"{a} on the left, {b} on the right please", f"put the {a} on the left side of the {b}"),
            "right of": (f"{b} on the left, {a} on the right please", f"put the {a} on the right side of the {b}"),
            "above": (f"{a} up top and {b} at the bottom", f"{article(b)} with {article(a)} higher up"),
            "below": (f"{b} up top and {a} at the bottom", f"{article(b)} with {article(a)} underneath"),
        }[rel]
        return rng.choice(options)
    if fam == "color_attr":
        (a, ca), (b, cb) = (gs[0].shape, gs[0].color), (gs[1].shape, gs[1].color)
        return rng.choice(
            (f"one {ca} {a}, one {cb} {b}", f"I'd like {article(ca)} {a} and {article(cb)} {b}",
             f"make the {a} {ca} and the {b} {cb}", f"{article(a)} in {ca} and {article(b)} in {cb}")
        )  # fmt: skip
    raise ValueError(f"unknown t2i family {fam!r}; known: {FAMILIES}")


def violations(scene: Scene, metadata: dict) -> list[str]:
    """The GenEval clauses that ``scene`` (ground truth) violates, one reason per violated clause."""
    out: list[str] = []
    matched: list[list | None] = []
    for clause in metadata.get("include", []):
        cls, n, color = clause["class"], clause["count"], clause.get("color")
        found = [o for o in scene.objects if o.shape == cls]
        ok = len(found) >= n
        if not ok:
            out.append(f"expected {cls}>={n}, found {len(found)}")
        elif color is not None and sum(o.color == color for o in found) < n:
            ok = False
            out.append(f"expected {color} {cls}>={n}, found {sum(o.color == color for o in found)}")
        elif "position" in clause:
            rel, ref = clause["position"]
            if ref >= len(matched) or matched[ref] is None:
                ok = False
                out.append(f"no target for {cls} to be {rel}")
            elif not all(relation_holds(o, t, rel) for o in found for t in matched[ref]):
                ok = False
                out.append(f"expected {cls} {rel} target {ref}")
        matched.append(found if ok else None)
    for clause in metadata.get("exclude", []):
        cls, n, color = clause["class"], clause["count"], clause.get("color")
        if scene.count(cls, color) >= n:
            out.append(f"expected {cls}<{n}, found {scene.count(cls, color)}")
    return out
