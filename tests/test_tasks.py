"""Task generators of the Shapes world, checked against the ground-truth scenes with independent logic.

The checks here re-derive everything from the text and the scene (their own prompt parser, GenEval clause
evaluation on scenes via ``Scene.count`` / ``relation_holds``, their own arithmetic and colour-mixing tables),
not from the generators' helpers.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from unirl.data.shapes import COLORS, NUMBER_WORDS, PLURALS, Scene, relation_holds
from unirl.data.tasks import TAGS, TASKS, Sample, corpus_lines, generate, parse_response, validate_sample

N_PER_TAG = 100
COLOR_RE = "|".join(COLORS)
SHAPE_RE = "circle|square|triangle"
NUM = {w: i for i, w in enumerate(NUMBER_WORDS)} | {str(i): i for i in range(11)} | {"a": 1, "an": 1}
REL_WORDS = [  # longest first, so "to the left of" is not read as "left of"
    ("to the left of", "left of"), ("to the right of", "right of"), ("left of", "left of"),
    ("right of", "right of"), ("above", "above"), ("over", "above"), ("below", "below"), ("under", "below"),
]  # fmt: skip
NP = re.compile(rf"(?P<num>\w+) (?:(?P<color>{COLOR_RE}) )?(?P<shape>{SHAPE_RE})(?P<pl>s?)")


def samples(task: str, tag: str, n: int = N_PER_TAG, res: int = 32, seed: int = 0) -> list[Sample]:
    rng = random.Random(f"{task}/{tag}/{seed}")
    return [generate(task, rng, res, tag) for _ in range(n)]


def scene(d: dict) -> Scene:
    return Scene.from_dict(d)


def n_violated(sc: Scene, md: dict) -> int:
    """GenEval's rules on a ground-truth scene: how many include/exclude clauses fail."""
    bad, groups = 0, []
    for c in md["include"]:
        objs = [o for o in sc.objects if o.shape == c["class"]]
        ok = len(objs) >= c["count"] and sc.count(c["class"], c.get("color")) >= c["count"]
        if ok and "position" in c:
            rel, i = c["position"]
            ok = groups[i] is not None and all(relation_holds(o, t, rel) for o in objs for t in groups[i])
        groups.append(objs if ok else None)
        bad += not ok
    return bad + sum(sc.count(c["class"], c.get("color")) >= c["count"] for c in md.get("exclude", []))


def np_clause(m: re.Match) -> dict:
    clause = {"class": m["shape"], "count": NUM[m["num"]]}
    return clause | ({"color": m["color"]} if m["color"] else {})


def parse_t2i(prompt: str) -> dict:
    """Expected GenEval metadata of a GenEval-style prompt, parsed from its words alone."""
    prefixes = "a photo of|an image of|a picture showing|a drawing of|a picture of|an illustration of"
    m = re.fullmatch(rf"(?:{prefixes}|a simple drawing of|a canvas with) (.+)", prompt)
    assert m, prompt
    text = m[1]
    for words, rel in REL_WORDS:
        if f" {words} " in text:
            a, b = (NP.fullmatch(x) for x in text.split(f" {words} "))
            include = [np_clause(b), np_clause(a) | {"position": [rel, 0]}]
            return {"tag": "position", "include": include, "prompt": prompt}
    nps = [NP.fullmatch(x) for x in text.split(" and ")]
    assert all(nps), prompt
    include = [np_clause(x) for x in nps]
    if len(nps) == 2:
        return {"tag": "color_attr" if nps[0]["color"] else "two_object", "include": include, "prompt": prompt}
    if nps[0]["num"] not in ("a", "an"):
        excl = [{"class": include[0]["class"], "count": include[0]["count"] + 1}]
        return {"tag": "counting", "include": include, "exclude": excl, "prompt": prompt}
    return {"tag": "colors" if nps[0]["color"] else "single_object", "include": include, "prompt": prompt}


def the(sc: Scene, shape: str, color: str | None) -> int:
    """Index of the one object named 'the [colour] shape' in ``sc`` (asserts it is unambiguous)."""
    idx = [i for i, o in enumerate(sc.objects) if o.shape == shape and (color is None or o.color == color)]
    assert len(idx) == 1, f"'the {color or ''} {shape}' is ambiguous or absent in {sc}"
    return idx[0]


def multiset(sc: Scene) -> Counter:
    return Counter(sc.objects)


def check_instruction(before: Scene, after: Scene, text: str) -> str:
    """Check that ``after`` is ``before`` edited as ``text`` says, and nothing else changed; return the op."""
    ref = rf"the (?:(?P<c>{COLOR_RE}) )?(?P<s>{SHAPE_RE})"  # an object named in the text
    noun = rf"(?:(?P<c>{COLOR_RE}) )?(?P<s>{SHAPE_RE})"
    if m := re.fullmatch(rf"(?:add|put) (?:an?|one more) {noun}(?: in the picture)?", text):
        (new,) = list((multiset(after) - multiset(before)).elements())
        assert not multiset(before) - multiset(after) and new.shape == m["s"] and m["c"] in (None, new.color)
        return "add"
    if m := re.fullmatch(rf"(?:remove|delete|take away) {ref}", text):
        gone = before.objects[the(before, m["s"], m["c"])]
        assert multiset(before) - multiset(after) == Counter([gone]) and not multiset(after) - multiset(before)
        return "remove"
    if m := re.fullmatch(rf"remove one (?P<s>{SHAPE_RE})", text):
        (gone,) = list((multiset(before) - multiset(after)).elements())
        assert gone.shape == m["s"] and not multiset(after) - multiset(before)
        return "remove"
    diffs = [i for i, (a, b) in enumerate(zip(before.objects, after.objects)) if a != b]
    assert len(before.objects) == len(after.objects) and len(diffs) == 1, (before, after, text)
    i = diffs[0]
    a, b = before.objects[i], after.objects[i]
    if m := re.fullmatch(rf"(?:make|turn|paint|change the colour of) {ref}(?: to)? (?P<new>{COLOR_RE})", text):
        assert i == the(before, m["s"], m["c"]) and b == type(a)(a.shape, m["new"], a.size, a.cx, a.cy)
        return "recolor"
    m = re.fullmatch(rf"make {ref} (?P<w>bigger|larger|smaller)", text)
    if m := m or re.fullmatch(rf"(?P<w>enlarge|shrink) {ref}", text):
        assert i == the(before, m["s"], m["c"])
        grow = m["w"] in ("bigger", "larger", "enlarge")
        assert (a.size, b.size) == (("small", "large") if grow else ("large", "small"))
        assert (a.shape, a.color, a.cx, a.cy) == (b.shape, b.color, b.cx, b.cy)
        return "resize"
    rel_re = "|".join(w for w, _ in REL_WORDS)
    if m := re.fullmatch(rf"(?:move|put) {ref} (?P<d>to the left|to the right|up|down)", text):
        assert i == the(before, m["s"], m["c"]) and (a.shape, a.color, a.size) == (b.shape, b.color, b.size)
        dx, dy = b.cx - a.cx, b.cy - a.cy
        assert {"to the left": dx < 0, "to the right": dx > 0, "up": dy < 0, "down": dy > 0}[m["d"]]
        return "move"
    ref2 = rf"the (?:(?P<c2>{COLOR_RE}) )?(?P<s2>{SHAPE_RE})"
    if m := re.fullmatch(rf"(?:move|put) {ref} (?P<rel>{rel_re}) {ref2}", text):
        assert i == the(before, m["s"], m["c"]) and (a.shape, a.color, a.size) == (b.shape, b.color, b.size)
        target = after.objects[the(after, m["s2"], m["c2"])]
        rel = dict(REL_WORDS)[m["rel"]]
        assert relation_holds(b, target, rel) and not relation_holds(a, target, rel)
        return "move"
    raise AssertionError(f"unparsed instruction {text!r}")


def check_response(meta: dict, answer: str) -> None:
    m = re.fullmatch(r"<think>([^<]+)</think><answer>([^<]+)</answer>", meta["response"])
    assert m and m[2] == answer and len(m[1].split()) <= 25, meta["response"]


# ------------------------------------------------------------------------------------------------- per task
@pytest.mark.parametrize("tag", TAGS["t2i"])
def test_t2i_prompts_metadata_and_minimal_scenes(tag: str) -> None:
    prompts = set()
    for s in samples("t2i", tag):
        validate_sample(s)
        md, sc = s.meta["metadata"], scene(s.meta["scene"])
        assert md == parse_t2i(s.meta["prompt"]) and md["tag"] == tag
        assert n_violated(sc, md) == 0
        # Minimal: exactly the named objects, nothing else.
        assert Counter(o.shape for o in sc.objects) == Counter({c["class"]: c["count"] for c in md["include"]})
        if tag in ("two_object", "position", "color_attr"):
            assert md["include"][0]["class"] != md["include"][1]["class"]
        prompts.add(" ".join(s.meta["prompt"].split(" ")[:2]))
    assert len(prompts) >= 6  # several phrasings ("a photo", "an image", "a picture", "a drawing", ...)


@pytest.mark.parametrize("tag", TAGS["edit"])
def test_edit_targets_differ_only_as_instructed(tag: str) -> None:
    reverse_op = {"add": "remove", "remove": "add"}.get(tag, tag)
    for s in samples("edit", tag):
        validate_sample(s)
        m = s.meta
        src, tgt = scene(m["source_scene"]), scene(m["scene"])
        assert 1 <= len(src.objects) <= 3
        assert check_instruction(src, tgt, m["prompt"]) == tag
        assert check_instruction(tgt, src, m["reverse_prompt"]) == reverse_op
        assert n_violated(tgt, m["metadata"]) == 0 and n_violated(src, m["source_metadata"]) == 0
        if tag == "remove":
            assert m["metadata"]["exclude"] == [{"class": m["edit"]["shape"], "count": 1}]
            assert n_violated(src, m["metadata"]) >= 1  # the source does not already pass the target metadata
        if tag in ("add", "recolor", "move"):
            assert n_violated(src, m["metadata"]) >= 1


@pytest.mark.parametrize("tag", TAGS["t2i_cot"])
def test_t2i_cot_resolves_by_reasoning(tag: str) -> None:
    mixes = {frozenset(("red", "yellow")): "orange", frozenset(("blue", "yellow")): "green"}
    mixes[frozenset(("red", "blue"))] = "purple"
    for s in samples("t2i_cot", tag):
        validate_sample(s)
        m = s.meta
        p, md = m["prompt"], m["metadata"]
        assert md == parse_t2i(m["explicit_prompt"]) and n_violated(scene(m["scene"]), md) == 0
        assert len(scene(m["scene"]).objects) == md["include"][0]["count"]
        check_response(m, m["explicit_prompt"])
        (clause,) = md["include"]
        if tag == "arithmetic":
            n = NUM
            if x := re.search(r"(\w+) minus (\w+)", p):
                value = n[x[1]] - n[x[2]]
            elif x := re.search(r"(\w+) plus (\w+)", p):
                value = n[x[1]] + n[x[2]]
            elif x := re.search(r"half of (\w+)", p):
                value = n[x[1]] // 2
            elif x := re.search(r"twice (\w+)", p):
                value = 2 * n[x[1]]
            else:
                x = re.search(r"the number of (?:sides|corners) of an? (triangle|square)", p)
                value = {"triangle": 3, "square": 4}[x[1]]
            shape = re.search(r"(circle|square|triangle)s\b", p)[1]
            assert (clause["class"], clause["count"]) == (shape, value) and 1 <= value <= 4
        elif tag == "color_mixing":
            a, b = re.search(rf"({COLOR_RE}) (?:and|mixed with) ({COLOR_RE})", p).groups()
            shape = re.search(SHAPE_RE, p)[0]
            assert clause == {"class": shape, "count": 1, "color": mixes[frozenset((a, b))]}
        else:
            prop = re.search(r"the shape (.+?)(?:,|$)", p)[1]
            shape = "triangle" if "three" in prop else "square" if "four" in prop else "circle"
            assert "no " in prop or "round" in prop or shape != "circle"
            color = re.search(rf"\b({COLOR_RE})\b", p)
            count = re.match(r"(?:draw |show |an image of )?(\w+) of the shape", p)
            want = {"class": shape, "count": NUM[count[1]] if count else 1} | ({"color": color[1]} if color else {})
            assert clause == want


@pytest.mark.parametrize("tag", TAGS["understand"])
def test_understand_answers_are_right(tag: str) -> None:
    answers = Counter()
    for s in samples("understand", tag):
        validate_sample(s)
        m, q = s.meta, s.meta["prompt"]
        check_response(m, m["answer"])
        answers[m["answer"]] += 1
        if tag == "arithmetic":
            assert s.images == {} and "scene" not in m
            a, op, b = re.search(r"(\w+) (plus|minus) (\w+)", q).groups()
            assert m["answer"] == str(NUM[a] + NUM[b] if op == "plus" else NUM[a] - NUM[b])
            continue
        sc = scene(m["scene"])
        if tag == "count":
            x = re.search(rf"(?:how many|count the) (?:({COLOR_RE}) )?({SHAPE_RE})s", q)
            assert m["answer"] == str(sc.count(x[2], x[1]))
        elif tag == "color":
            shape = re.search(SHAPE_RE, q)[0]
            assert m["answer"] == sc.objects[the(sc, shape, None)].color
        elif tag == "yesno":
            x = re.search(rf"an? (?:({COLOR_RE}) )?({SHAPE_RE})", q)
            assert m["answer"] == ("yes" if sc.count(x[2], x[1]) else "no")
        elif x := re.fullmatch(rf"which shape is ([a-z ]+) the ({SHAPE_RE})\?", q):
            ref = sc.objects[the(sc, x[2], None)]
            holding = [o.shape for o in sc.objects if o != ref and relation_holds(o, ref, x[1])]
            assert holding == [m["answer"]]
        else:
            x = re.fullmatch(rf"is the ({SHAPE_RE}) ([a-z ]+) the ({SHAPE_RE})\?", q)
            a, b = sc.objects[the(sc, x[1], None)], sc.objects[the(sc, x[3], None)]
            assert m["answer"] == ("yes" if relation_holds(a, b, x[2]) else "no")
    if tag in ("yesno", "relation"):
        assert abs(answers["yes"] - answers["no"]) <= 0.3 * (answers["yes"] + answers["no"]), answers
    if tag == "count":
        assert len(answers) >= 4


@pytest.mark.parametrize("tag", TAGS["prompt_refine"])
def test_prompt_refine_rewrites_the_request(tag: str) -> None:
    casual_rel = [  # (pattern, relation) of the casual position requests: group 'a' stands <relation> 'b'
        (r"(?P<a>\w+) on the left, (?P<b>\w+) on the right please", "left of"),
        (r"(?P<b>\w+) on the left, (?P<a>\w+) on the right please", "right of"),
        (r"put the (?P<a>\w+) on the left side of the (?P<b>\w+)", "left of"),
        (r"put the (?P<a>\w+) on the right side of the (?P<b>\w+)", "right of"),
        (r"(?P<a>\w+) up top and (?P<b>\w+) at the bottom", "above"),
        (r"(?P<b>\w+) up top and (?P<a>\w+) at the bottom", "below"),
        (r"an? (?P<b>\w+) with an? (?P<a>\w+) higher up", "above"),
        (r"an? (?P<b>\w+) with an? (?P<a>\w+) underneath", "below"),
    ]
    props = {"corners": None, "round": "circle", "no": "circle", "three": "triangle", "four": "square"}
    for s in samples("prompt_refine", tag):
        validate_sample(s)
        m, user = s.meta, s.meta["prompt"]
        md = m["metadata"]
        assert md == parse_t2i(m["rewrite"]) and md["tag"] == tag and user != m["rewrite"]
        check_response(m, m["rewrite"])
        sc = scene(m["scene"])
        assert n_violated(sc, md) == 0
        for c in md["include"]:
            named = c["class"] in user or any(w in user.split() and props[w] == c["class"] for w in props if props[w])
            assert named and c.get("color", "") in user, (user, md)
            if tag == "counting" and c["count"] > 1:
                assert re.search(rf"\b({NUMBER_WORDS[c['count']]}|{c['count']})\b", user)
        if tag == "position":
            matches = [(x, rel) for pat, rel in casual_rel if (x := re.fullmatch(pat, user))]
            x, rel = next((x, rel) for x, rel in matches if x["a"] == md["include"][1]["class"])
            a, b = (sc.objects[the(sc, x[k], None)] for k in ("a", "b"))
            assert relation_holds(a, b, rel) and md["include"][1]["position"][0] == rel


def test_reflect_flaws_violate_exactly_one_clause() -> None:
    kinds, families = Counter(), Counter()
    for tag in TAGS["reflect"]:
        for s in samples("reflect", tag, n=2 * N_PER_TAG):
            validate_sample(s)
            m = s.meta
            md, judged, target = m["metadata"], scene(m["scene"]), scene(m["target_scene"])
            assert md == parse_t2i(m["prompt"]) and md["tag"] == m["family"]
            families[m["family"]] += 1
            assert n_violated(target, md) == 0
            if tag == "correct":
                assert m["verdict"] == "correct" and judged == target and set(s.images) == {"png"}
                check_response(m, "correct")
                continue
            assert m["verdict"] == "incorrect" and set(s.images) == {"png", "tgt.png"}
            assert n_violated(judged, md) == 1, (m["prompt"], m["flaw"], judged)
            check_instruction(judged, target, m["instruction"])
            check_response(m, f"edit: {m['instruction']}")
            kinds[m["flaw"].split(":")[0]] += 1
    assert set(kinds) == {"wrong colour", "wrong count", "wrong relation", "missing object"}
    assert set(families) == set(TAGS["t2i"])


# ------------------------------------------------------------------------------------------------ properties
def test_deterministic_given_the_seed() -> None:
    for task in TASKS:
        for tag in TAGS[task]:
            a, b = samples(task, tag, n=5, seed=7), samples(task, tag, n=5, seed=7)
            for x, y in zip(a, b):
                assert json.dumps(x.meta, sort_keys=True) == json.dumps(y.meta, sort_keys=True)
                assert {k: v.tobytes() for k, v in x.images.items()} == {k: v.tobytes() for k, v in y.images.items()}
    other = samples("t2i", "position", n=5, seed=8)
    assert [s.meta for s in other] != [s.meta for s in samples("t2i", "position", n=5, seed=7)]


@pytest.mark.parametrize("res", [32, 64, 256])
def test_every_task_at_each_resolution(res: int) -> None:
    rng = random.Random(res)
    for task in TASKS:
        for tag in TAGS[task]:
            s = generate(task, rng, res, tag)
            validate_sample(s)
            assert s.meta["resolution"] == res and all(im.size == (res, res) for im in s.images.values())


def test_untagged_generation_covers_the_tags() -> None:
    rng = random.Random(0)
    assert {generate("edit", rng, 32).meta["tag"] for _ in range(60)} == set(TAGS["edit"])


def test_corpus_lines_hold_every_text() -> None:
    s = samples("edit", "recolor", n=1)[0]
    assert corpus_lines(s) == [s.meta["prompt"], s.meta["reverse_prompt"]]
    s = samples("reflect", "flawed", n=1)[0]
    lines = corpus_lines(s)
    assert {s.meta[k] for k in ("prompt", "instruction", "flaw", "response")} <= set(lines)
    assert all(isinstance(x, str) and x for x in lines)
    s = samples("understand", "arithmetic", n=1)[0]
    assert s.meta["answer"] in corpus_lines(s) and s.meta["response"] in corpus_lines(s)


def test_parse_response() -> None:
    assert parse_response("<think>3 plus 4 is 7.</think><answer>7</answer>") == ("3 plus 4 is 7.", "7")
    assert parse_response("<answer>7</answer>") is None
    assert parse_response("<think>a</think><answer>7</answer> trailing") is None


# ------------------------------------------------------------------------------------------------ bad input
def _broken(mutate) -> Sample:
    s = samples("t2i", "counting", n=1)[0]
    mutate(s)
    return s


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: s.meta.pop("metadata"), "missing field"),
        (lambda s: s.meta.update(tag="bogus"), "unknown or not"),
        (lambda s: s.meta["metadata"]["include"][0].update(count=s.meta["metadata"]["include"][0]["count"] + 1),
         "violates 1"),
        (lambda s: s.meta["metadata"]["include"][0].update(**{"class": "hexagon"}), "class among"),
        (lambda s: s.meta["metadata"].update(prompt="a photo of nothing"), "metadata prompt"),
        (lambda s: s.images.update(png=s.images["png"].resize((64, 64))), r"expected RGB \(32, 32\)"),
        (lambda s: s.images.update(png=s.images["png"].rotate(90)), "not the render"),
        (lambda s: s.images.pop("png"), "images must be"),
    ],
)  # fmt: skip
def test_validate_sample_rejects_malformed(mutate, message: str) -> None:
    s = _broken(mutate)
    with pytest.raises(ValueError, match=message):
        validate_sample(s)


def test_validate_sample_rejects_bad_responses() -> None:
    s = samples("understand", "count", n=1)[0]
    s.meta["response"] = s.meta["response"].replace("<answer>", "<answer>x")
    with pytest.raises(ValueError, match="differs from the expected"):
        validate_sample(s)
    s.meta["response"] = "no tags"
    with pytest.raises(ValueError, match="is not <think>"):
        validate_sample(s)


def test_generate_rejects_unknown_task_and_tag() -> None:
    with pytest.raises(ValueError, match="unknown task 'paint'"):
        generate("paint", random.Random(0), 32)
    with pytest.raises(ValueError, match="unknown tag 'add' for task 't2i'"):
        generate("t2i", random.Random(0), 32, "add")


def test_plural_table_is_used_consistently() -> None:
    s = samples("t2i", "counting", n=50)
    for x in s:
        c = x.meta["metadata"]["include"][0]
        assert (PLURALS[c["class"]] in x.meta["prompt"]) == (c["count"] > 1)
