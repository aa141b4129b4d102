"""Text for the LM-facing Shapes tasks: reasoning prompts (t2i_cot) and questions with answers (understand).

Reasoning prompts name a scene only indirectly; each resolves to a GenEval :class:`Spec` with a one-sentence
trace:

- ``arithmetic``: a count from "seven minus five", "one plus two", "half of eight", "twice two", "the number
  of sides of a triangle" or "the number of corners of a square" (results 1-4) -> a counting spec;
- ``color_mixing``: a shape in the colour of a two-colour mix whose result is in the palette
  (red+yellow=orange, blue+yellow=green, red+blue=purple) -> a colors spec;
- ``shape_property``: "the shape with three corners" (-> triangle), "with no corners" (-> circle), "with four
  equal sides" (-> square), plain (single_object), with a colour (colors) or a count (counting).

Questions (``understand``) are about a ground-truth scene: ``count`` ("how many circles are there?", digits,
0-4, optionally of one colour), ``color`` ("what colour is the square?", the class unique in its scene),
``relation`` ("is the circle left of the square?" yes/no balanced, or "which shape is above the triangle?"
with exactly one object in that relation) and ``yesno`` ("is there a blue triangle?", yes/no balanced, "no"
often a near miss: the shape in another colour or the colour on another shape); ``arithmetic`` is text-only
("what is 3 plus 4?", operands 0-9, non-negative results, answers in digits). Answers are canonical: digits,
colour name, shape name, "yes"/"no". Every question also carries a one-sentence trace.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from unirl.data.shapes import COLORS, NUMBER_WORDS, PLURALS, RELATIONS, SHAPES, SIZES, Scene, place, relation_holds
from unirl.data.t2i_prompts import SHAPE_PROPERTIES, Group, Spec, article, noun_phrase

COT_TAGS: tuple[str, ...] = ("arithmetic", "color_mixing", "shape_property")
UNDERSTAND_TAGS: tuple[str, ...] = ("count", "color", "relation", "yesno", "arithmetic")
MIXES: dict[tuple[str, str], str] = {
    ("red", "yellow"): "orange", ("blue", "yellow"): "green", ("red", "blue"): "purple"
}  # fmt: skip
COT_PREFIXES: tuple[str, ...] = ("{}", "draw {}", "an image of {}", "show {}")
MAX_OBJECTS = 4


@dataclass(frozen=True)
class Reasoning:
    prompt: str  # the reasoning prompt
    trace: str  # one-sentence reasoning
    spec: Spec  # the scene it resolves to


@dataclass(frozen=True)
class Question:
    prompt: str
    answer: str
    trace: str
    scene: Scene | None  # None for text-only problems


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def _count_fact(n: int, rng: random.Random) -> tuple[str, str]:
    """(expression, fact) whose value is ``n`` (1-4): ('seven minus five', 'seven minus five is two')."""
    w = NUMBER_WORDS
    kinds = ["minus", "half"] + (["plus"] if n >= 2 else []) + (["twice"] if n in (2, 4) else [])
    kinds += ["sides", "corners"] if n in (3, 4) else []
    kind = rng.choice(kinds)
    if kind == "minus":
        b = rng.randint(1, 10 - n)
        expr = f"{w[n + b]} minus {w[b]}"
    elif kind == "plus":
        a = rng.randint(1, n - 1)
        expr = f"{w[a]} plus {w[n - a]}"
    elif kind == "half":
        expr = f"half of {w[2 * n]}"
    elif kind == "twice":
        expr = f"twice {w[n // 2]}"
    else:
        shape = "triangle" if n == 3 else "square"
        expr = f"the number of {kind} of {article(shape)}"
        return expr, f"{article(shape)} has {w[n]} {kind}"
    return expr, f"{expr} is {w[n]}"


def reasoning_prompt(tag: str, rng: random.Random) -> Reasoning:
    """One reasoning prompt of family ``tag`` (see the module docstring)."""
    shape = rng.choice(SHAPES)
    if tag == "arithmetic":
        n = rng.randint(1, 4)
        expr, fact = _count_fact(n, rng)
        pl = PLURALS[shape]
        text = rng.choice((f"{expr} {pl}", f"{expr}, in {pl}", f"as many {pl} as {expr}"))
        spec = Spec("counting", (Group(shape, n),))
    elif tag == "color_mixing":
        (a, b), c = rng.choice(list(MIXES.items()))
        a, b = (a, b) if rng.random() < 0.5 else (b, a)
        text = rng.choice(
            (f"a {shape} in the colour you get by mixing {a} and {b}", f"a {shape} coloured like {a} mixed with {b}",
             f"a {shape} whose colour is a mix of {a} and {b}")
        )  # fmt: skip
        fact = f"mixing {a} and {b} gives {c}"
        spec = Spec("colors", (Group(shape, color=c),))
    elif tag == "shape_property":
        prop = rng.choice(SHAPE_PROPERTIES[shape])
        fact = f"the shape {prop} is {article(shape)}"
        variant = rng.choice(("plain", "color", "count"))
        if variant == "plain":
            text, spec = f"the shape {prop}", Spec("single_object", (Group(shape),))
        elif variant == "color":
            c = rng.choice(COLORS)
            text = rng.choice((f"the shape {prop}, in {c}", f"{article(c)} version of the shape {prop}"))
            spec = Spec("colors", (Group(shape, color=c),))
        else:
            n = rng.randint(2, 4)
            text = f"{rng.choice((NUMBER_WORDS[n], str(n)))} of the shape {prop}"
            spec = Spec("counting", (Group(shape, n),))
    else:
        raise ValueError(f"unknown t2i_cot tag {tag!r}; known: {COT_TAGS}")
    trace = _cap(f"{fact}, so {noun_phrase(spec.groups[0], counting=spec.family == 'counting')}.")
    return Reasoning(rng.choice(COT_PREFIXES).format(text), trace, spec)


def _random_scene(rng: random.Random, shapes: list[str]) -> Scene:
    return place(rng, [(s, rng.choice(COLORS), rng.choice(tuple(SIZES))) for s in shapes])


def _count_words(n: int, color: str | None, shape: str) -> str:
    noun = " ".join(([color] if color else []) + [shape if n == 1 else PLURALS[shape]])
    return f"{'no' if n == 0 else NUMBER_WORDS[n]} {noun}"


def question(tag: str, rng: random.Random) -> Question:
    """One question of family ``tag`` with its canonical answer and trace (see the module docstring)."""
    if tag == "count":
        shape, n = rng.choice(SHAPES), rng.randint(0, MAX_OBJECTS)
        color = rng.choice(COLORS) if rng.random() < 0.4 else None
        k = rng.randint(0 if n else 1, min(2, MAX_OBJECTS - n))
        others = [s for s in SHAPES if s != shape]
        specs = [(shape, color or rng.choice(COLORS), rng.choice(tuple(SIZES))) for _ in range(n)]
        for _ in range(k):  # distractors: another class, or (colour questions) the class in another colour
            if color is not None and rng.random() < 0.5:
                specs.append((shape, rng.choice([c for c in COLORS if c != color]), rng.choice(tuple(SIZES))))
            else:
                specs.append((rng.choice(others), rng.choice(COLORS), rng.choice(tuple(SIZES))))
        rng.shuffle(specs)
        scene = place(rng, specs)
        noun = f"{color} {PLURALS[shape]}" if color else PLURALS[shape]
        text = rng.choice((f"how many {noun} are there?", f"how many {noun} are in the image?", f"count the {noun}."))
        found = scene.count(shape, color)
        return Question(text, str(found), _cap(f"I count {_count_words(found, color, shape)}."), scene)
    if tag == "color":
        shape = rng.choice(SHAPES)
        others = [s for s in SHAPES if s != shape]
        scene = _random_scene(rng, [shape] + [rng.choice(others) for _ in range(rng.randint(0, 2))])
        color = scene.objects[0].color
        text = rng.choice(
            (f"what colour is the {shape}?", f"which colour does the {shape} have?",
             f"what is the colour of the {shape}?", f"tell me the colour of the {shape}.")
        )  # fmt: skip
        return Question(text, color, f"The {shape} is {color}.", scene)
    if tag == "relation":
        shapes = rng.sample(SHAPES, rng.randint(2, 3))
        rel = rng.choice(RELATIONS)
        scene = place(rng, [(s, rng.choice(COLORS), rng.choice(tuple(SIZES))) for s in shapes], relation=(0, rel, 1))
        a, b = scene.objects[0], scene.objects[1]
        fact = f"The {a.shape} is {rel} the {b.shape}."
        if rng.random() < 0.5:
            holding = [o.shape for o in scene.objects if o is not b and relation_holds(o, b, rel)]
            if holding != [a.shape]:
                raise RuntimeError("the relation does not single out one shape; redraw")
            return Question(f"which shape is {rel} the {b.shape}?", a.shape, fact, scene)
        asked = rel if rng.random() < 0.5 else rng.choice([r for r in RELATIONS if r != rel])
        answer = "yes" if relation_holds(a, b, asked) else "no"
        trace = fact if answer == "yes" else f"The {a.shape} is {rel} the {b.shape}, not {asked} it."
        return Question(f"is the {a.shape} {asked} the {b.shape}?", answer, trace, scene)
    if tag == "yesno":
        scene = _random_scene(rng, [rng.choice(SHAPES) for _ in range(rng.randint(1, 3))])
        use_color = rng.random() < 0.7
        present = sorted({(o.color if use_color else None, o.shape) for o in scene.objects}, key=str)
        if rng.random() < 0.5:
            color, shape = rng.choice(present)
        else:
            pairs = [(c, s) for c in (COLORS if use_color else (None,)) for s in SHAPES if (c, s) not in present]
            if not pairs:
                raise RuntimeError("every shape is present; redraw")
            near = [p for p in pairs if any(p[0] == q[0] or p[1] == q[1] for q in present)] if use_color else []
            color, shape = rng.choice(near if near and rng.random() < 0.7 else pairs)
        noun = f"{color} {shape}" if color else shape
        yes = scene.count(shape, color) > 0
        a_noun = article(noun)
        text = rng.choice((f"is there {a_noun}?", f"is there {a_noun} in the image?", f"do you see {a_noun}?"))
        trace = f"There is {article(noun)}." if yes else f"There is no {noun}."
        return Question(text, "yes" if yes else "no", trace, scene)
    if tag == "arithmetic":
        op = rng.choice(("plus", "minus"))
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        if op == "minus" and b > a:
            a, b = b, a
        result = a + b if op == "plus" else a - b
        x, y = (NUMBER_WORDS[a], NUMBER_WORDS[b]) if rng.random() < 0.3 else (str(a), str(b))
        text = rng.choice((f"what is {x} {op} {y}?", f"how much is {x} {op} {y}?", f"compute {x} {op} {y}."))
        return Question(text, str(result), f"{a} {op} {b} is {result}.", None)
    raise ValueError(f"unknown understand tag {tag!r}; known: {UNDERSTAND_TAGS}")
