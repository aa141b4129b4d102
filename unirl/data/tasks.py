"""Task generators of the Shapes world: one :class:`Sample` record per training example of each RL scenario.

``generate(task, rng, resolution, tag)`` draws one sample of a scenario of DESIGN.md section 2, deterministic
given the rng. Every ``meta`` holds ``task``, ``tag``, ``prompt`` (the main text input), ``resolution`` and,
when an image is shown or targeted, ``scene`` (``Scene.to_dict``); where an image is generated or judged,
``metadata`` is GenEval-schema metadata of the target image. LM-facing tasks carry ``response``, the exact
target text ``<think>{one sentence}</think><answer>{answer}</answer>``: every LM task uses this one format,
prompt refinement and reflection included, so a single format reward covers them all.

- ``t2i``: GenEval's six families (:mod:`unirl.data.t2i_prompts`); image ``png``.
- ``edit``: source, instruction, target (:mod:`unirl.data.edits`); images ``src.png`` and ``tgt.png``; meta
  adds ``reverse_prompt``, ``source_scene``, ``source_metadata`` and ``edit`` (the structured operation).
- ``t2i_cot``: reasoning prompts (:mod:`unirl.data.questions`); meta adds ``reasoning``, ``explicit_prompt``
  (canonical GenEval wording), ``response``; image ``png`` of the resolved scene.
- ``understand``: visual questions on image ``png`` and text-only arithmetic (no image, no scene); meta adds
  ``answer``, ``response``.
- ``prompt_refine``: a casual user request; meta adds ``rewrite`` (canonical "a photo of ..." prompt, the
  same wording as ``explicit_prompt``), ``response`` with a one-sentence think; image ``png`` of the rewrite.
- ``reflect``: a t2i prompt and the image judged (``png``), correct or violating exactly one clause; meta adds
  ``family``, ``verdict``, ``instruction`` (the correcting edit, "" when correct), ``flaw`` ("" when correct),
  ``target_scene`` (the corrected scene; equals ``scene`` when correct), ``response`` (answer ``correct`` or
  ``edit: {instruction}``); flawed samples also hold the corrected image ``tgt.png``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass

from PIL import Image

from unirl.data.edits import EDIT_TAGS, flawed_scene, make_edit, retry
from unirl.data.questions import COT_TAGS, UNDERSTAND_TAGS, question, reasoning_prompt
from unirl.data.shapes import COLORS, RELATIONS, SHAPES, Scene, render
from unirl.data.t2i_prompts import FAMILIES, body, build_scene, casual_phrase, phrase, sample_spec, violations

TASKS: tuple[str, ...] = ("t2i", "edit", "t2i_cot", "understand", "prompt_refine", "reflect")
TAGS: dict[str, tuple[str, ...]] = {
    "t2i": FAMILIES,
    "edit": EDIT_TAGS,
    "t2i_cot": COT_TAGS,
    "understand": UNDERSTAND_TAGS,
    "prompt_refine": FAMILIES,
    "reflect": ("correct", "flawed"),
}
RESPONSE_RE = re.compile(r"<think>(?P<think>[^<]+)</think><answer>(?P<answer>[^<]+)</answer>")
_COMMON = ("task", "tag", "prompt", "resolution")
# Meta fields per task beyond the common ones (``scene`` is absent only for text-only understanding).
FIELDS: dict[str, tuple[str, ...]] = {
    "t2i": ("scene", "metadata"),
    "edit": ("reverse_prompt", "source_scene", "scene", "metadata", "source_metadata", "edit"),
    "t2i_cot": ("scene", "metadata", "reasoning", "explicit_prompt", "response"),
    "understand": ("answer", "response"),
    "prompt_refine": ("scene", "metadata", "rewrite", "response"),
    "reflect": ("scene", "target_scene", "metadata", "family", "verdict", "instruction", "flaw", "response"),
}
TEXT_FIELDS: tuple[str, ...] = (
    "prompt", "reverse_prompt", "reasoning", "explicit_prompt", "answer", "rewrite", "instruction", "flaw", "response"
)  # fmt: skip


@dataclass
class Sample:
    """One example: its task, its images (webdataset extension -> image) and JSON-serialisable metadata."""

    task: str
    images: dict[str, Image.Image]
    meta: dict


def respond(think: str, answer: str) -> str:
    """The LM target text in the reward's tag format."""
    return f"<think>{think}</think><answer>{answer}</answer>"


def parse_response(text: str) -> tuple[str, str] | None:
    """(think, answer) of a response in the exact tag format, or None when it does not parse."""
    m = RESPONSE_RE.fullmatch(text.strip())
    return (m["think"], m["answer"]) if m else None


def _meta(task: str, tag: str, prompt: str, resolution: int, scene: Scene | None, **extra) -> dict:
    meta: dict = {"task": task, "tag": tag, "prompt": prompt, "resolution": resolution}
    if scene is not None:
        meta["scene"] = scene.to_dict()
    return meta | extra


def generate(task: str, rng: random.Random, resolution: int, tag: str | None = None) -> Sample:
    """One sample of ``task`` (a tag drawn from ``TAGS[task]`` when ``tag`` is None), deterministic in ``rng``."""
    if task not in TAGS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    tag = tag if tag is not None else rng.choice(TAGS[task])
    if tag not in TAGS[task]:
        raise ValueError(f"unknown tag {tag!r} for task {task!r}; known: {TAGS[task]}")
    return _GENERATORS[task](tag, rng, resolution)


def _t2i(tag: str, rng: random.Random, res: int) -> Sample:
    spec = sample_spec(tag, rng)
    scene = retry(lambda r: build_scene(spec, r), rng)
    prompt = phrase(spec, rng)
    meta = _meta("t2i", tag, prompt, res, scene, metadata=spec.metadata(prompt))
    return Sample("t2i", {"png": render(scene, res)}, meta)


def _edit(tag: str, rng: random.Random, res: int) -> Sample:
    e = make_edit(tag, rng)
    meta = _meta("edit", tag, e.instruction, res, None, reverse_prompt=e.reverse, source_scene=e.source.to_dict())
    meta |= {"scene": e.target.to_dict(), "metadata": e.metadata, "source_metadata": e.source_metadata, "edit": e.op}
    return Sample("edit", {"src.png": render(e.source, res), "tgt.png": render(e.target, res)}, meta)


def _t2i_cot(tag: str, rng: random.Random, res: int) -> Sample:
    r = reasoning_prompt(tag, rng)
    scene = retry(lambda g: build_scene(r.spec, g), rng)
    explicit = phrase(r.spec)
    meta = _meta("t2i_cot", tag, r.prompt, res, scene, metadata=r.spec.metadata(explicit), reasoning=r.trace)
    meta |= {"explicit_prompt": explicit, "response": respond(r.trace, explicit)}
    return Sample("t2i_cot", {"png": render(scene, res)}, meta)


def _understand(tag: str, rng: random.Random, res: int) -> Sample:
    q = retry(lambda g: question(tag, g), rng)
    images = {} if q.scene is None else {"png": render(q.scene, res)}
    meta = _meta("understand", tag, q.prompt, res, q.scene, answer=q.answer, response=respond(q.trace, q.answer))
    return Sample("understand", images, meta)


def _prompt_refine(tag: str, rng: random.Random, res: int) -> Sample:
    spec = sample_spec(tag, rng)
    scene = retry(lambda r: build_scene(spec, r), rng)
    user, rewrite = casual_phrase(spec, rng), phrase(spec)
    meta = _meta("prompt_refine", tag, user, res, scene, metadata=spec.metadata(rewrite), rewrite=rewrite)
    meta["response"] = respond(f"The user wants {body(spec)}.", rewrite)
    return Sample("prompt_refine", {"png": render(scene, res)}, meta)


def _reflect(tag: str, rng: random.Random, res: int) -> Sample:
    family = rng.choice(FAMILIES)
    spec = sample_spec(family, rng)
    prompt = phrase(spec, rng)
    extra = {"metadata": spec.metadata(prompt), "family": family}
    if tag == "correct":
        scene = retry(lambda r: build_scene(spec, r), rng)
        think = f"The image shows {body(spec)}, as the prompt asks."
        meta = _meta("reflect", tag, prompt, res, scene, target_scene=scene.to_dict(), **extra)
        meta |= {"verdict": "correct", "instruction": "", "flaw": "", "response": respond(think, "correct")}
        return Sample("reflect", {"png": render(scene, res)}, meta)
    correct, flaw = flawed_scene(spec, rng)
    think = f"The prompt asks for {body(spec)}, but {flaw.description}."
    meta = _meta("reflect", tag, prompt, res, flaw.scene, target_scene=correct.to_dict(), **extra)
    meta |= {"verdict": "incorrect", "instruction": flaw.instruction, "flaw": f"{flaw.kind}: {flaw.description}"}
    meta["response"] = respond(think, f"edit: {flaw.instruction}")
    return Sample("reflect", {"png": render(flaw.scene, res), "tgt.png": render(correct, res)}, meta)


_GENERATORS = {
    "t2i": _t2i,
    "edit": _edit,
    "t2i_cot": _t2i_cot,
    "understand": _understand,
    "prompt_refine": _prompt_refine,
    "reflect": _reflect,
}


def corpus_lines(sample: Sample) -> list[str]:
    """Every text of a sample (prompts, traces, instructions, questions, answers, responses), for the tokenizer."""
    return [sample.meta[k] for k in TEXT_FIELDS if isinstance(sample.meta.get(k), str) and sample.meta[k]]


# ------------------------------------------------------------------------------------------------- validation
def _fail(sample: Sample, msg: str) -> None:
    m = sample.meta
    raise ValueError(f"{m.get('task', sample.task)}/{m.get('tag')} sample (prompt {m.get('prompt')!r}): {msg}")


def check_metadata(md: object) -> str | None:
    """Why ``md`` is not GenEval-schema metadata over the Shapes vocabulary, or None when it is."""
    if not isinstance(md, dict):
        return f"metadata must be a dict, got {type(md).__name__}"
    if set(md) - {"tag", "include", "exclude", "prompt"} or not {"tag", "include", "prompt"} <= set(md):
        return f"metadata keys must be tag, include, exclude?, prompt; got {sorted(md)}"
    if not isinstance(md["include"], list) or not md["include"]:
        return "metadata include must be a non-empty list"
    for kind in ("include", "exclude"):
        for i, c in enumerate(md.get(kind, [])):
            if not isinstance(c, dict) or c.get("class") not in SHAPES:
                return f"{kind}[{i}] needs a class among {SHAPES}, got {c!r}"
            if not isinstance(c.get("count"), int) or c["count"] < 1:
                return f"{kind}[{i}] needs an integer count >= 1, got {c.get('count')!r}"
            if "color" in c and c["color"] not in COLORS:
                return f"{kind}[{i}] colour {c['color']!r} is not among {COLORS}"
            if "position" in c:
                p = c["position"]
                if kind == "exclude" or not (isinstance(p, list) and len(p) == 2 and p[0] in RELATIONS):
                    return f"{kind}[{i}] position must be [relation, index] with a relation in {RELATIONS}, got {p!r}"
                if not isinstance(p[1], int) or not 0 <= p[1] < i:
                    return f"{kind}[{i}] position index {p[1]!r} must point to an earlier include clause"
    return None


def _check_scene(sample: Sample, scene: Scene, md: dict, name: str, expect: int = 0) -> None:
    """``scene`` violates exactly ``expect`` clauses of ``md``; satisfied colour clauses are unambiguous."""
    bad = violations(scene, md)
    if len(bad) != expect:
        _fail(sample, f"{name} should violate {expect} clause(s) of its metadata, violates {len(bad)}: {bad}")
    for c in md["include"]:
        colors = {o.color for o in scene.objects if o.shape == c["class"]}
        if "color" in c and len(colors) > 1:
            _fail(sample, f"{name} mixes colours {sorted(colors)} of {c['class']}: GenEval colour clause is ambiguous")


def validate_sample(sample: Sample) -> None:
    """Raise ``ValueError`` naming the sample and the problem when ``sample`` is malformed."""
    meta, task = sample.meta, sample.task
    if task not in TAGS:
        raise ValueError(f"unknown task {task!r}; known: {TASKS}")
    missing = [k for k in _COMMON + FIELDS[task] if k not in meta]
    if task == "understand" and meta.get("tag") != "arithmetic" and "scene" not in meta:
        missing.append("scene")
    if missing:
        _fail(sample, f"meta is missing field(s) {missing}")
    if meta["task"] != task or meta["tag"] not in TAGS[task]:
        _fail(sample, f"meta task/tag {meta['task']!r}/{meta['tag']!r} unknown or not {task!r}; tags: {TAGS[task]}")
    if not isinstance(meta["prompt"], str) or not meta["prompt"].strip():
        _fail(sample, "prompt is empty")
    res = meta["resolution"]
    if not isinstance(res, int) or res < 16:
        _fail(sample, f"resolution must be an int >= 16, got {res!r}")
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        _fail(sample, f"meta is not JSON-serialisable: {e}")
    scenes = {k: Scene.from_dict(meta[k]) for k in ("scene", "source_scene", "target_scene") if k in meta}
    expected = {"png": "scene"} if "scene" in scenes else {}
    if task == "edit":
        expected = {"src.png": "source_scene", "tgt.png": "scene"}
    if task == "reflect" and meta["tag"] == "flawed":
        expected["tgt.png"] = "target_scene"
    if set(sample.images) != set(expected):
        _fail(sample, f"images must be {sorted(expected)}, got {sorted(sample.images)}")
    for ext, key in expected.items():
        img = sample.images[ext]
        if img.size != (res, res) or img.mode != "RGB":
            _fail(sample, f"image {ext} is {img.mode} {img.size}, expected RGB ({res}, {res})")
        if img.tobytes() != render(scenes[key], res).tobytes():
            _fail(sample, f"image {ext} is not the render of meta[{key!r}]")
    for key in ("metadata", "source_metadata"):
        if key in meta and (why := check_metadata(meta[key])):
            _fail(sample, f"{key}: {why}")
    _validate_semantics(sample, scenes)


def _validate_semantics(sample: Sample, scenes: dict[str, Scene]) -> None:
    meta, task, tag = sample.meta, sample.task, sample.meta["tag"]
    md = meta.get("metadata")
    text_of_md = {"t2i_cot": "explicit_prompt", "prompt_refine": "rewrite"}.get(task, "prompt")
    if md is not None and md["prompt"] != meta[text_of_md]:
        _fail(sample, f"metadata prompt {md['prompt']!r} differs from meta[{text_of_md!r}]")
    if task in ("t2i", "prompt_refine") and md["tag"] != tag:
        _fail(sample, f"metadata tag {md['tag']!r} differs from the sample tag {tag!r}")
    if task == "reflect":
        flawed = tag == "flawed"
        _check_scene(sample, scenes["scene"], md, "judged scene", expect=int(flawed))
        _check_scene(sample, scenes["target_scene"], md, "target scene")
        if meta["verdict"] != ("incorrect" if flawed else "correct") or bool(meta["instruction"]) != flawed:
            _fail(sample, f"verdict {meta['verdict']!r} / instruction {meta['instruction']!r} disagree with tag {tag}")
    elif md is not None:
        _check_scene(sample, scenes["scene"], md, "scene")
    if task == "edit":
        if meta["source_metadata"]["prompt"] != meta["reverse_prompt"]:
            _fail(sample, "source_metadata prompt differs from reverse_prompt")
        _check_scene(sample, scenes["source_scene"], meta["source_metadata"], "source scene")
    if "response" in meta:
        parsed = parse_response(meta["response"])
        if parsed is None:
            _fail(sample, f"response {meta['response']!r} is not <think>...</think><answer>...</answer>")
        want = {
            "t2i_cot": meta.get("explicit_prompt"),
            "understand": meta.get("answer"),
            "prompt_refine": meta.get("rewrite"),
            "reflect": "correct" if tag == "correct" else f"edit: {meta.get('instruction')}",
        }[task]
        if parsed[1] != want:
            _fail(sample, f"response answer {parsed[1]!r} differs from the expected {want!r}")
