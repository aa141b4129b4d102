"""Benchmarks of the unified model on the held-out test splits, with fixed prompts and fixed per-sample seeds.

Every image is sampled with the model's Euler ODE sampler and classifier-free guidance whose unconditional branch
is the ZEROED connector output (editing: the triple form with the reference guidance ``w_ref``), from initial
noise drawn by a generator seeded with :func:`sample_seed` ``(seed, index)`` of that sample alone: a sample's image
does not depend on the batch it is drawn in, and two checkpoints see the same noise for the same prompt. Text is
decoded greedily (temperature 0). The judge is :func:`unirl.data.verifier.score` (GenEval rules; binary
``correct`` and partial ``score``) with a pluggable detector.

The image benchmarks (``geneval``, ``edit``, ``cot``, ``refine``) draw ``images_per_prompt`` images per prompt (and
arm), sample ``i``'s draw ``j`` from seed ``sample_seed(seed, i * k + j)``; their metrics average every draw, and
their per-sample records hold the mean over the sample's draws. On 48 prompts one draw each, two noise seeds
differ by ~0.1 in the partial score (docs/results.md), as much as an RL stage is asked to gain.

Benchmarks (metric names as they appear in ``results.json``):

- ``geneval``: T2I on GenEval-format test prompts, ``images_per_prompt`` images each. ``geneval/<tag>`` = share of
  correct images of the tag, ``geneval/overall`` = mean over tags (GenEval's summary); ``geneval_score/<tag>`` and
  ``geneval_score/overall``: the same with the partial score.
- ``edit``: source image + instruction -> edited image, judged against the target metadata: ``edit/correct``
  (binary), ``edit/score`` (partial), ``edit/<tag>`` (correct per edit kind) and ``edit/preservation``: the share
  of the source's untouched objects found again in the edited image with the same class and colour and a centre
  within the object's radius of where it was (samples without untouched objects are left out of the mean).
- ``cot``: reasoning prompts. ``cot/with_reasoning``: the LM writes its reasoning, and the image is sampled from
  the LM hidden states of prompt + completion + t2i queries; ``cot/without_reasoning``: the raw reasoning prompt
  goes straight to the t2i queries. Both the partial score (these names) and ``..._correct`` (binary).
- ``vqa``: understanding questions (image or text): ``vqa/accuracy`` (normalised answer match), ``vqa/<tag>``,
  ``vqa/format``.
- ``reflect``: the LM judges a (possibly flawed) image against its prompt, answering ``correct`` or
  ``edit: <instruction>``. ``reflect/judgement`` = accuracy of the verdict; ``reflect/score_before`` /
  ``reflect/score_after``: partial score of the judged image and of the final image (the LM's edit applied by
  the DM, or the image unchanged when the LM answers ``correct``); ``..._correct_before/after`` binary.
- ``refine``: the LM rewrites a casual request; ``refine/score`` = partial score of images sampled from the
  rewrite (the ``<answer>`` content, or the whole completion when it has none), ``refine/raw_score`` = from the raw
  request, with the same seeds; ``refine/correct``, ``refine/raw_correct`` binary, ``refine/format``.

A metric with no sample to average over is omitted (never NaN).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from PIL import Image

from unirl.data.shapes import Scene
from unirl.data.verifier import Detector, score
from unirl.eval.geneval import detector_classes, score_records, summarize
from unirl.models.unified import UnifiedModel
from unirl.rewards.text import answer_accuracy, extract_answer, format_reward

log = logging.getLogger(__name__)

__all__ = [
    "BENCHMARKS",
    "IMAGE_BENCHMARKS",
    "BenchmarkResult",
    "Sampling",
    "bench_cot",
    "bench_edit",
    "bench_geneval",
    "bench_refine",
    "bench_reflect",
    "bench_vqa",
    "lm_prompt",
    "parse_verdict",
    "preservation",
    "sample_images",
    "sample_seed",
    "select_balanced",
]

SEED_STRIDE = 1_000_003  # per-sample seed = seed * SEED_STRIDE + index


@dataclass(frozen=True)
class Sampling:
    """The sampling settings recorded with every number (resolved from the checkpoint where not given)."""

    steps: int
    cfg_scale: float
    ref_cfg_scale: float
    seed: int
    resolution: int
    max_new_tokens: int = 64
    batch_size: int = 16
    cfg_max_sigma: float = 1.0  # the checkpoint's t2i guidance interval (guidance at sigma <= this)
    cfg_schedule: str = "constant"  # the checkpoint's t2i guidance weight over sigma (constant or linear)
    unconditional: str = "zeroed connector output (CFG null branch); editing: triple CFG with w_ref"
    noise: str = f"per-sample generator seeded with seed * {SEED_STRIDE} + sample index"
    decoding: str = "greedy (temperature 0)"

    @classmethod
    def for_model(cls, model: UnifiedModel, steps: int | None = None, cfg_scale: float | None = None,
                  ref_cfg_scale: float | None = None, seed: int = 0, max_new_tokens: int = 64,
                  batch_size: int = 16) -> Sampling:
        """Settings for ``model``: ``None`` takes the checkpoint's own ``config.sampling`` value."""
        s = model.config.sampling
        return cls(steps=int(steps or s.steps), cfg_scale=float(s.cfg_scale if cfg_scale is None else cfg_scale),
                   ref_cfg_scale=float(s.ref_cfg_scale if ref_cfg_scale is None else ref_cfg_scale),
                   seed=int(seed), resolution=int(model.config.resolution), max_new_tokens=int(max_new_tokens),
                   batch_size=int(batch_size), cfg_max_sigma=float(s.cfg_max_sigma),
                   cfg_schedule=str(s.cfg_schedule))

    def record(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchmarkResult:
    """A benchmark's metrics, the first few samples as (image, outcome, prompt) for the grids, per-sample records."""

    metrics: dict[str, float]
    previews: list[tuple[Image.Image, str, str]] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    images: list[list[Image.Image]] | None = None  # geneval: the samples of each prompt (GenEval folder layout)


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample ``index`` of a benchmark run with ``seed``.

    >>> sample_seed(0, 5), sample_seed(1, 0)
    (5, 1000003)
    """
    return int(seed) * SEED_STRIDE + int(index)


def select_balanced(items: Sequence[Any], n: int, tag: Callable[[Any], str]) -> list[Any]:
    """The first ``n`` items taken round-robin over tags (sorted tag names, file order within a tag).

    >>> select_balanced(["a1", "a2", "a3", "b1"], 3, tag=lambda s: s[0])
    ['a1', 'b1', 'a2']
    """
    groups: dict[str, list[Any]] = {}
    for it in items:
        groups.setdefault(tag(it), []).append(it)
    order = [groups[t] for t in sorted(groups)]
    out: list[Any] = []
    depth = 0
    while len(out) < n and any(depth < len(g) for g in order):
        out += [g[depth] for g in order if depth < len(g)][: n - len(out)]
        depth += 1
    return out


def lm_prompt(meta: Mapping[str, Any], templates: Mapping[str, str] | None = None) -> str:
    """The user-turn text for a sample: ``templates[task]`` formatted with the meta fields, else ``meta["prompt"]``."""
    template = (templates or {}).get(meta.get("task", ""))
    return template.format(**meta) if template else meta["prompt"]


@torch.no_grad()
def sample_images(model: UnifiedModel, prompts: Sequence[str], seeds: Sequence[int], sampling: Sampling,
                  images: Sequence[Image.Image] | None = None, task: str = "t2i",
                  prefix_ids: Sequence[Sequence[int]] | None = None) -> list[Image.Image]:
    """Euler ODE sampling with CFG in batches, sample i from a generator seeded with ``seeds[i]``.

    Sample i equals ``model.generate_images([prompts[i]], ..., seed=seeds[i])`` up to batching round-off: the same
    draws in the same order (reference noise for editing, then the initial latents) from its own generator.
    """
    if len(seeds) != len(prompts):
        raise ValueError(f"sample_images got {len(prompts)} prompts but {len(seeds)} seeds")
    out: list[Image.Image] = []
    B = sampling.batch_size
    for start in range(0, len(prompts), B):
        sl = slice(start, start + B)
        src = list(images[sl]) if images is not None else None
        cond = model.encode(list(prompts[sl]), src, task, list(prefix_ids[sl]) if prefix_ids is not None else None)
        gens = [torch.Generator().manual_seed(int(s)) for s in seeds[sl]]
        ref = None
        if task == "i2i":
            lat = model.encode_images(src)  # (b, C, h, w)
            ref = torch.cat([model.noise_reference(lat[i : i + 1], g) for i, g in enumerate(gens)])  # (b, C, h, w)
        x = torch.cat([torch.randn((1, *model.latent_shape), generator=g) for g in gens])  # (b, C, h, w)
        x = x.to(model.device, model.dtype)
        sigmas = model.scheduler.sigmas(sampling.steps, device=model.device)  # (steps + 1,)
        for k in range(sampling.steps):
            v = model.guided_velocity(x, sigmas[k], cond, ref, sampling.cfg_scale, sampling.ref_cfg_scale)
            x = model.scheduler.step(x, v, sigmas[k], sigmas[k + 1])
        out += model.decode_latents(x)
    return out


def _greedy(model: UnifiedModel, prompts: Sequence[str], images: Sequence[Image.Image | None] | None,
            sampling: Sampling) -> tuple[list[str], list[list[int]]]:
    texts: list[str] = []
    ids: list[list[int]] = []
    B = sampling.batch_size
    for start in range(0, len(prompts), B):
        sl = slice(start, start + B)
        out = model.sample_text(list(prompts[sl]), list(images[sl]) if images is not None else None,
                                max_new_tokens=sampling.max_new_tokens, temperature=0.0)
        texts += out.texts
        ids += out.completion_ids
    return texts, ids


# ------------------------------------------------------------------------------------------------ pure scoring
def parse_verdict(text: str) -> tuple[str | None, str]:
    """(verdict, instruction) of a reflection completion: ``("correct", "")``, ``("incorrect", instruction)``, or
    ``(None, "")`` when the ``<answer>`` is missing or neither form.

    >>> parse_verdict("<think>ok</think><answer>correct</answer>")
    ('correct', '')
    >>> parse_verdict("<answer>edit: add a square</answer>"), parse_verdict("<answer>maybe</answer>")
    (('incorrect', 'add a square'), (None, ''))
    """
    answer = extract_answer(text)
    if answer is None:
        return None, ""
    if answer.strip().lower() == "correct":
        return "correct", ""
    if answer.lower().startswith("edit:") and answer[5:].strip():
        return "incorrect", answer[5:].strip()
    return None, ""


def untouched_objects(source_scene: Mapping[str, Any], edit: Mapping[str, Any]) -> list[Any]:
    """The source objects an edit leaves alone: all of them for ``add``, all but ``edit["index"]`` otherwise."""
    objects = list(Scene.from_dict(dict(source_scene)).objects)
    if edit["op"] == "add":
        return objects
    return [o for i, o in enumerate(objects) if i != edit["index"]]


def preservation(image: Image.Image, source_scene: Mapping[str, Any], edit: Mapping[str, Any],
                 detector: Detector) -> float | None:
    """Share of the untouched source objects found in ``image`` (same class and colour, centre within the object's
    radius of its source centre; one detection per object, greedy by distance); None when there is none."""
    keep = untouched_objects(source_scene, edit)
    if not keep:
        return None
    w, h = image.size
    free = list(detector(image))
    found = 0
    for o in keep:
        cx, cy, tol = o.cx * w, o.cy * h, o.radius * max(w, h)
        cands = [(((d.center[0] - cx) ** 2 + (d.center[1] - cy) ** 2) ** 0.5, k) for k, d in enumerate(free)
                 if d.cls == o.shape and d.color == o.color]
        best = min(cands, default=None)
        if best is not None and best[0] <= tol:
            found += 1
            free.pop(best[1])
    return found / len(keep)


def _mean(xs: Sequence[float | None]) -> float | None:
    vals = [float(x) for x in xs if x is not None]
    return sum(vals) / len(vals) if vals else None


def _put(metrics: dict[str, float], name: str, value: float | None) -> None:
    if value is not None:
        metrics[name] = float(value)


def _per_tag(metrics: dict[str, float], prefix: str, tags: Sequence[str], values: Sequence[float]) -> None:
    for tag in dict.fromkeys(tags):
        _put(metrics, f"{prefix}/{tag}", _mean([v for t, v in zip(tags, values) if t == tag]))


def _judge(images: Sequence[Image.Image], metadatas: Sequence[Mapping[str, Any]],
           detector: Detector) -> list[dict[str, Any]]:
    classes = detector_classes(detector)
    return [score(im, dict(md), detector, classes) for im, md in zip(images, metadatas)]


def _mark(ok: bool) -> str:
    return "ok" if ok else "x"


def _lm_inputs(samples: Sequence[Any], templates: Mapping[str, str] | None) -> tuple[list[dict], list[str]]:
    """The samples' metas and the LM user turns built from them (:func:`lm_prompt`)."""
    metas = [s.meta for s in samples]
    return metas, [lm_prompt(m, templates) for m in metas]


def _arm_means(arms: Mapping[str, Sequence[Mapping[str, Any]]], score_name: str,
               correct_name: str) -> dict[str, float | None]:
    """Mean partial score, then mean ``correct`` rate, of each arm's verifier results (two arms compared on the
    same seeds), under ``score_name.format(arm)`` and ``correct_name.format(arm)``, in the order of ``arms``."""
    out = {score_name.format(a): _mean([j["score"] for j in js]) for a, js in arms.items()}
    out |= {correct_name.format(a): _mean([float(j["correct"]) for j in js]) for a, js in arms.items()}
    return out


def _previews(images: Sequence[Image.Image], caption: Callable[[int], str], metas: Sequence[Mapping[str, Any]],
              n: int) -> list[tuple[Image.Image, str, str]]:
    """``(image, caption(i), prompt)`` of the first ``n`` samples: the report's preview grid."""
    return [(images[i], caption(i), metas[i]["prompt"]) for i in range(min(n, len(metas)))]


def _repeat(xs: Sequence[Any] | None, k: int) -> list[Any] | None:
    """Each item ``k`` times in a row, prompt-major: draw ``j`` of item ``i`` is ``i * k + j``."""
    return None if xs is None else [x for x in xs for _ in range(k)]


def _draw(model: UnifiedModel, prompts: Sequence[str], sampling: Sampling, k: int,
          images: Sequence[Image.Image] | None = None, task: str = "t2i",
          prefix_ids: Sequence[Sequence[int]] | None = None) -> list[Image.Image]:
    """``k`` images per prompt, prompt-major (len(prompts) * k), draw ``j`` of sample ``i`` from seed
    ``sample_seed(seed, i * k + j)``: with ``k = 1`` sample ``i`` keeps the seed it has without repeats."""
    if k < 1:
        raise ValueError(f"images_per_prompt must be >= 1, got {k}")
    seeds = [sample_seed(sampling.seed, i) for i in range(len(prompts) * k)]
    return sample_images(model, _repeat(prompts, k), seeds, sampling, images=_repeat(images, k), task=task,
                         prefix_ids=_repeat(prefix_ids, k))


def _per_sample(values: Sequence[float | None], k: int) -> list[float | None]:
    """Mean over each sample's ``k`` consecutive draws (the per-sample record of a multi-draw benchmark)."""
    return [_mean(values[i : i + k]) for i in range(0, len(values), k)]


def _sample_scores(judged: Sequence[Mapping[str, Any]], k: int) -> list[float | None]:
    """Each sample's partial score, the mean over its ``k`` judged draws."""
    return _per_sample([j["score"] for j in judged], k)


# ------------------------------------------------------------------------------------------------- benchmarks
def bench_geneval(model: UnifiedModel, metadatas: Sequence[Mapping[str, Any]], sampling: Sampling,
                  detector: Detector, images_per_prompt: int = 4, preview_n: int = 6,
                  templates: Mapping[str, str] | None = None) -> BenchmarkResult:
    """GenEval protocol on ``metadatas`` (GenEval schema): ``images_per_prompt`` images per prompt."""
    k = int(images_per_prompt)
    flat = _draw(model, [md["prompt"] for md in metadatas], sampling, k)  # (n * k,) prompt-major
    records = score_records(flat, _repeat(metadatas, k), detector)
    summary = summarize(records)
    metrics = {f"geneval/{t}": v["correct"] for t, v in summary["tags"].items()}
    metrics["geneval/overall"] = summary["overall"]
    metrics |= {f"geneval_score/{t}": v["score"] for t, v in summary["tags"].items()}
    _put(metrics, "geneval_score/overall", summary["overall_score"])
    metrics["geneval/correct_prompts"] = summary["correct_prompts"]
    previews = [(flat[i * k], _mark(records[i * k]["correct"]), metadatas[i]["prompt"])
                for i in range(min(preview_n, len(metadatas)))]
    per_prompt = [flat[i * k : (i + 1) * k] for i in range(len(metadatas))]
    return BenchmarkResult(metrics, previews, records, images=per_prompt)


def bench_edit(model: UnifiedModel, samples: Sequence[Any], sampling: Sampling, detector: Detector,
               preview_n: int = 6, templates: Mapping[str, str] | None = None,
               images_per_prompt: int = 1) -> BenchmarkResult:
    """Editing correctness (target metadata), partial score and source preservation on edit test samples, over
    ``images_per_prompt`` edits of each source (the metrics average all of them)."""
    k = int(images_per_prompt)
    metas = [s.meta for s in samples]
    sources = [s.images["src.png"] for s in samples]
    edited = _draw(model, [m["prompt"] for m in metas], sampling, k, images=sources, task="i2i")  # (n * k,)
    flat_metas = _repeat(metas, k)
    judged = _judge(edited, [m["metadata"] for m in flat_metas], detector)
    kept = [preservation(im, m["source_scene"], m["edit"], detector) for im, m in zip(edited, flat_metas)]
    correct = [float(j["correct"]) for j in judged]
    metrics: dict[str, float] = {"edit/correct": _mean(correct), "edit/score": _mean([j["score"] for j in judged])}
    _put(metrics, "edit/preservation", _mean(kept))
    _per_tag(metrics, "edit", [m["tag"] for m in flat_metas], correct)
    per_sample = zip(metas, judged[::k], _per_sample(correct, k), _sample_scores(judged, k), _per_sample(kept, k))
    records = [{"tag": m["tag"], "prompt": m["prompt"], "correct": c, "score": sc, "preservation": p,
                "reason": first["reason"]} for m, first, c, sc, p in per_sample]
    previews = _previews(edited[::k], lambda i: _mark(judged[i * k]["correct"]), metas, preview_n)
    return BenchmarkResult(metrics, previews, records)


def bench_cot(model: UnifiedModel, samples: Sequence[Any], sampling: Sampling, detector: Detector,
              preview_n: int = 6, templates: Mapping[str, str] | None = None,
              images_per_prompt: int = 1) -> BenchmarkResult:
    """Reasoning-to-image with the LM's reasoning (hidden states of its completion) and without (raw prompt),
    ``images_per_prompt`` images per prompt and arm (one greedy completion per prompt), on the same seeds."""
    k = int(images_per_prompt)
    metas, prompts = _lm_inputs(samples, templates)
    texts, ids = _greedy(model, prompts, None, sampling)
    with_r = _draw(model, prompts, sampling, k, prefix_ids=ids)  # (n * k,)
    without = _draw(model, prompts, sampling, k)  # (n * k,)
    mds = [m["metadata"] for m in _repeat(metas, k)]
    jw, jo = _judge(with_r, mds, detector), _judge(without, mds, detector)
    fmt = format_reward(texts, prompts, metas)
    metrics = _arm_means({"with": jw, "without": jo}, "cot/{}_reasoning", "cot/{}_reasoning_correct")
    metrics["cot/format"] = _mean(fmt)
    records = [{"tag": m["tag"], "prompt": m["prompt"], "completion": t, "with_score": a, "without_score": b}
               for m, t, a, b in zip(metas, texts, _sample_scores(jw, k), _sample_scores(jo, k))]
    previews = _previews(with_r[::k], lambda i: f"{_mark(jw[i * k]['correct'])} {extract_answer(texts[i]) or '-'}",
                         metas, preview_n)
    return BenchmarkResult(metrics, previews, records)


def bench_vqa(model: UnifiedModel, samples: Sequence[Any], sampling: Sampling, detector: Detector | None = None,
              preview_n: int = 6, templates: Mapping[str, str] | None = None) -> BenchmarkResult:
    """Visual (and text) question answering, greedy: answer accuracy overall and per tag, and the format rate."""
    metas, prompts = _lm_inputs(samples, templates)
    texts, _ = _greedy(model, prompts, [s.images.get("png") for s in samples], sampling)
    acc = answer_accuracy(texts, prompts, metas)
    metrics: dict[str, float] = {"vqa/accuracy": _mean(acc), "vqa/format": _mean(format_reward(texts, prompts, metas))}
    _per_tag(metrics, "vqa", [m["tag"] for m in metas], acc)
    records = [{"tag": m["tag"], "prompt": m["prompt"], "answer": m["answer"], "completion": t, "correct": a}
               for m, t, a in zip(metas, texts, acc)]
    previews = [(s.images["png"], f"{_mark(a == 1.0)} {extract_answer(t) or '-'}", s.meta["prompt"])
                for s, t, a in zip(samples, texts, acc) if "png" in s.images][:preview_n]
    return BenchmarkResult(metrics, previews, records)


def bench_reflect(model: UnifiedModel, samples: Sequence[Any], sampling: Sampling, detector: Detector,
                  preview_n: int = 6, templates: Mapping[str, str] | None = None) -> BenchmarkResult:
    """Reflection: verdict accuracy, and the verifier score before and after the LM's correction is applied."""
    metas, prompts = _lm_inputs(samples, templates)
    judged_images = [s.images["png"] for s in samples]
    texts, _ = _greedy(model, prompts, judged_images, sampling)
    verdicts = [parse_verdict(t) for t in texts]
    to_edit = [i for i, (v, _) in enumerate(verdicts) if v == "incorrect"]
    final = list(judged_images)
    if to_edit:
        seeds = [sample_seed(sampling.seed, i) for i in to_edit]
        edited = sample_images(model, [verdicts[i][1] for i in to_edit], seeds, sampling,
                               images=[judged_images[i] for i in to_edit], task="i2i")
        for i, im in zip(to_edit, edited):
            final[i] = im
    mds = [m["metadata"] for m in metas]
    before, after = _judge(judged_images, mds, detector), _judge(final, mds, detector)
    right = [float(v == m["verdict"]) for (v, _), m in zip(verdicts, metas)]
    metrics = {
        "reflect/judgement": _mean(right),
        **_arm_means({"before": before, "after": after}, "reflect/score_{}", "reflect/correct_{}"),
        "reflect/format": _mean(format_reward(texts, prompts, metas)),
        "reflect/edit_rate": len(to_edit) / len(samples),
    }
    records = [{"tag": m["tag"], "prompt": m["prompt"], "verdict": m["verdict"], "completion": t, "judged": v,
                "score_before": b["score"], "score_after": a["score"]}
               for m, t, (v, _), b, a in zip(metas, texts, verdicts, before, after)]
    previews = _previews(final, lambda i: f"{_mark(right[i] == 1.0)} {extract_answer(texts[i]) or '-'}", metas,
                         preview_n)
    return BenchmarkResult(metrics, previews, records)


def bench_refine(model: UnifiedModel, samples: Sequence[Any], sampling: Sampling, detector: Detector,
                 preview_n: int = 6, templates: Mapping[str, str] | None = None,
                 images_per_prompt: int = 1) -> BenchmarkResult:
    """Prompt refinement: images from the LM's rewrite vs from the raw request (same seeds, ``images_per_prompt``
    per prompt and arm), judged by metadata."""
    k = int(images_per_prompt)
    metas, prompts = _lm_inputs(samples, templates)
    texts, _ = _greedy(model, prompts, None, sampling)
    rewrites = [extract_answer(t) or t for t in texts]
    refined = _draw(model, rewrites, sampling, k)  # (n * k,)
    raw = _draw(model, [m["prompt"] for m in metas], sampling, k)  # (n * k,)
    mds = [m["metadata"] for m in _repeat(metas, k)]
    jr, jraw = _judge(refined, mds, detector), _judge(raw, mds, detector)
    metrics = _arm_means({"": jr, "raw_": jraw}, "refine/{}score", "refine/{}correct")
    metrics["refine/format"] = _mean(format_reward(texts, prompts, metas))
    records = [{"tag": m["tag"], "prompt": m["prompt"], "rewrite": r, "score": a, "raw_score": b}
               for m, r, a, b in zip(metas, rewrites, _sample_scores(jr, k), _sample_scores(jraw, k))]
    previews = _previews(refined[::k], lambda i: f"{_mark(jr[i * k]['correct'])} {rewrites[i]}", metas, preview_n)
    return BenchmarkResult(metrics, previews, records)


# the benchmarks that sample images from prompts, and take images_per_prompt
IMAGE_BENCHMARKS: tuple[str, ...] = ("geneval", "edit", "cot", "refine")

# name -> (function, data task it reads from the shards; "geneval" reads the GenEval metadata file)
BENCHMARKS: dict[str, tuple[Callable[..., BenchmarkResult], str]] = {
    "geneval": (bench_geneval, "t2i"),
    "edit": (bench_edit, "edit"),
    "cot": (bench_cot, "t2i_cot"),
    "vqa": (bench_vqa, "understand"),
    "reflect": (bench_reflect, "reflect"),
    "refine": (bench_refine, "prompt_refine"),
}
