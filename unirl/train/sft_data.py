"""SFT data and held-out evaluation: shards into memory, step-derived batches, GenEval-style and format scores.

* **Data** - the train split of every task is read once into memory (32 px images are tiny). T2I and edit images
  are turned into DiT latents up front (:class:`DMData`); LM examples keep their prompt, target response and the
  image the LM sees (understanding questions with a scene, reflection), see :func:`load_lm_data`.
* **Batches** - every batch is a pure function of ``(seed, phase, step, micro-batch, rank)``
  (:func:`step_rng`), so a resumed run sees exactly the batches of an uninterrupted one and ranks see different
  data. T2I batches draw a tag by ``tag_weights`` then a sample of that tag (weighting towards the simple tags).
* **Evaluation** - :func:`evaluate_t2i`: images from held-out test prompts (fixed seed) judged by the Shapes
  verifier, per tag ``correct`` (GenEval's binary) and ``score`` (its partial credit). :func:`evaluate_lm_format`:
  greedy completions of held-out prompts, the share per task that parses in the task's format
  (:func:`format_ok`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from unirl.data.shards import read_samples
from unirl.data.tasks import parse_response
from unirl.data.verifier import score as verifier_score
from unirl.models.unified import UnifiedModel

LM_TASKS: tuple[str, ...] = ("t2i_cot", "understand", "prompt_refine", "reflect")
PHASE_IDS = {"lm": 1, "dm": 2, "eval": 3}


def step_rng(seed: int, phase: str, step: int, micro: int = 0, rank: int = 0) -> np.random.Generator:
    """The NumPy generator of one micro-batch: a pure function of its coordinates (exact resume, per-rank data)."""
    return np.random.default_rng([seed, PHASE_IDS[phase], step, micro, rank])


def step_generator(seed: int, phase: str, step: int, micro: int = 0, rank: int = 0) -> torch.Generator:
    """A torch generator for the noise of one micro-batch, seeded from the same coordinates."""
    key = f"{seed}/{phase}/{step}/{micro}/{rank}".encode()
    return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:7], "little"))


def _task_dir(shards_dir: str | Path, task: str) -> Path:
    d = Path(shards_dir) / task
    if not d.is_dir():
        raise FileNotFoundError(f"no shards for task {task!r} at {d}: run the curate stage first (unirl curate)")
    return d


def read_split(shards_dir: str | Path, task: str, split: str, max_bad_fraction: float, resolution: int) -> list:
    """All samples of one task split (a list of :class:`~unirl.data.shards.ShardSample`)."""
    samples = list(read_samples(_task_dir(shards_dir, task), split, max_bad_fraction=max_bad_fraction,
                                resolution=resolution))
    if not samples:
        raise ValueError(f"task {task!r} split {split!r} under {shards_dir} holds no samples; re-run curate")
    return samples


# ---------------------------------------------------------------------------------------------------- LM data
@dataclass
class LMExample:
    """One LM training/eval example: chat prompt, target response and the image the LM sees (or None)."""

    task: str
    prompt: str
    response: str
    image: Image.Image | None
    meta: dict = field(repr=False, default_factory=dict)


def lm_example(task: str, sample: Any) -> LMExample:
    """Map a shard sample of an LM task to its example (which tasks show their image to the LM)."""
    meta = sample.meta
    shows_image = task == "reflect" or (task == "understand" and "scene" in meta)
    image = sample.images.get("png") if shows_image else None
    if shows_image and image is None:
        raise ValueError(f"{task} sample {sample.key} in {sample.shard} has no png image for the LM")
    return LMExample(task, meta["prompt"], meta["response"], image, meta)


def load_lm_data(shards_dir: str | Path, tasks: Sequence[str], split: str, max_bad_fraction: float,
                 resolution: int) -> dict[str, list[LMExample]]:
    """Task -> examples of ``split`` for each LM task in ``tasks``."""
    return {t: [lm_example(t, s) for s in read_split(shards_dir, t, split, max_bad_fraction, resolution)]
            for t in tasks}


def sample_lm_batch(data: Mapping[str, Sequence[LMExample]], weights: Mapping[str, float], batch_size: int,
                    rng: np.random.Generator) -> list[LMExample]:
    """``batch_size`` examples: a task per example by ``weights``, then a uniform example of that task."""
    tasks = [t for t in weights if weights[t] > 0 and data.get(t)]
    if not tasks:
        raise ValueError(f"no LM task with positive weight has data: weights {dict(weights)}, data {list(data)}")
    p = np.array([weights[t] for t in tasks], dtype=np.float64)
    picks = rng.choice(len(tasks), size=batch_size, p=p / p.sum())
    return [data[tasks[k]][int(rng.integers(len(data[tasks[k]])))] for k in picks]


@torch.no_grad()
def image_information(model: UnifiedModel, data: Mapping[str, Sequence[LMExample]], per_task: int,
                      batch_size: int = 32) -> dict[str, float]:
    """How much the LM reads its images: per task, the mean gain in log-likelihood (nats per response) of the target
    responses given their own image over the same responses given another example's image (the images rolled by
    one within each batch).

    About 0 means the LM answers from the text alone (the prior); tasks without images are left out. Only examples
    with an image count; a final batch of one has no other image to swap in and is skipped.
    """
    out: dict[str, float] = {}
    for task, examples in data.items():
        ex = [e for e in examples if e.image is not None][:per_task]
        gains: list[float] = []
        for i in range(0, len(ex), batch_size):
            chunk = ex[i:i + batch_size]
            if len(chunk) < 2:
                continue
            prompts, images = [e.prompt for e in chunk], [e.image for e in chunk]
            ids = [model.inputs.response_ids(e.response) for e in chunk]
            own, mask = model.completion_logprobs(prompts, ids, images)  # (B, T) each
            other, _ = model.completion_logprobs(prompts, ids, images[1:] + images[:1])  # (B, T)
            gains += ((own - other) * mask).sum(-1).tolist()
        if gains:
            out[task] = float(np.mean(gains))
    return out


# ---------------------------------------------------------------------------------------------------- DM data
@dataclass
class DMData:
    """T2I and edit training data as tensors: latents (N, C, h, w) and their prompts."""

    t2i_latents: torch.Tensor
    t2i_prompts: list[str]
    t2i_tags: list[str]
    edit_src: torch.Tensor
    edit_tgt: torch.Tensor
    edit_images: list[Image.Image]  # source images, for the LM's vision tower
    edit_prompts: list[str]

    def tag_index(self) -> dict[str, np.ndarray]:
        tags = np.array(self.t2i_tags)
        return {t: np.flatnonzero(tags == t) for t in dict.fromkeys(self.t2i_tags)}


def load_dm_data(model: UnifiedModel, shards_dir: str | Path, max_bad_fraction: float, resolution: int,
                 with_edit: bool = True) -> DMData:
    """Read the t2i (and edit) train splits and encode their images into DiT latents."""
    t2i = read_split(shards_dir, "t2i", "train", max_bad_fraction, resolution)
    lat = torch.cat([model.encode_images([s.images["png"] for s in t2i[i:i + 256]])
                     for i in range(0, len(t2i), 256)]).cpu()  # (N, C, h, w)
    edit = read_split(shards_dir, "edit", "train", max_bad_fraction, resolution) if with_edit else []
    if edit:
        src = torch.cat([model.encode_images([s.images["src.png"] for s in edit[i:i + 256]])
                         for i in range(0, len(edit), 256)]).cpu()  # (M, C, h, w)
        tgt = torch.cat([model.encode_images([s.images["tgt.png"] for s in edit[i:i + 256]])
                         for i in range(0, len(edit), 256)]).cpu()  # (M, C, h, w)
    else:
        src = tgt = torch.zeros((0, *lat.shape[1:]))  # (0, C, h, w)
    return DMData(lat, [s.meta["prompt"] for s in t2i], [s.meta["tag"] for s in t2i], src, tgt,
                  [s.images["src.png"] for s in edit], [s.meta["prompt"] for s in edit])


def sample_t2i_indices(data: DMData, tag_index: Mapping[str, np.ndarray], tag_weights: Mapping[str, float],
                       batch_size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of a T2I batch: a tag per example by ``tag_weights`` (missing tags weigh 1), then uniform."""
    tags = list(tag_index)
    p = np.array([float(tag_weights.get(t, 1.0)) for t in tags], dtype=np.float64)
    if p.sum() <= 0:
        raise ValueError(f"t2i tag weights {dict(tag_weights)} give no tag a positive weight")
    picks = rng.choice(len(tags), size=batch_size, p=p / p.sum())
    return np.array([tag_index[tags[k]][rng.integers(len(tag_index[tags[k]]))] for k in picks])


# ---------------------------------------------------------------------------------------------------- evaluation
def heldout_t2i(shards_dir: str | Path, per_tag: int, max_bad_fraction: float, resolution: int) -> list[dict]:
    """The first ``per_tag`` test prompts of each t2i tag: ``{"prompt", "tag", "metadata"}`` (fixed order)."""
    out: dict[str, list[dict]] = {}
    for s in read_split(shards_dir, "t2i", "test", max_bad_fraction, resolution):
        rows = out.setdefault(s.meta["tag"], [])
        if len(rows) < per_tag:
            rows.append({"prompt": s.meta["prompt"], "tag": s.meta["tag"], "metadata": s.meta["metadata"]})
    return [r for rows in out.values() for r in rows]


@torch.no_grad()
def generate_heldout(model: UnifiedModel, items: Sequence[dict], steps: int, cfg_scale: float | None, seed: int,
                     batch_size: int = 64) -> list[Image.Image]:
    """Images for ``items`` with fixed seeds (chunk k uses ``seed + k``), so every evaluation is comparable;
    ``cfg_scale`` None: the model's ``sampling.cfg_scale``."""
    images: list[Image.Image] = []
    for k, i in enumerate(range(0, len(items), batch_size)):
        chunk = items[i:i + batch_size]
        images += model.generate_images([r["prompt"] for r in chunk], task="t2i", steps=steps, cfg_scale=cfg_scale,
                                        seed=seed + k)
    return images


def evaluate_t2i(model: UnifiedModel, items: Sequence[dict], steps: int, cfg_scale: float | None, seed: int,
                 batch_size: int = 64) -> tuple[dict[str, Any], list[Image.Image]]:
    """GenEval-style scores per tag (``correct`` and partial ``score``) and their means; returns the images too."""
    images = generate_heldout(model, items, steps, cfg_scale, seed, batch_size)
    per_tag: dict[str, dict[str, list[float]]] = {}
    for im, r in zip(images, items):
        res = verifier_score(im, r["metadata"])
        d = per_tag.setdefault(r["tag"], {"correct": [], "score": []})
        d["correct"].append(float(res["correct"]))
        d["score"].append(float(res["score"]))
    tags = {t: {"correct": float(np.mean(d["correct"])), "score": float(np.mean(d["score"])),
                "n": len(d["correct"])} for t, d in per_tag.items()}
    overall = {"correct": float(np.mean([v["correct"] for v in tags.values()])),
               "score": float(np.mean([v["score"] for v in tags.values()]))}
    return {"per_tag": tags, "overall": overall}, images


def format_ok(task: str, text: str) -> bool:
    """Whether a completion has the task's format.

    Every task: exactly ``<think>one sentence</think><answer>...</answer>``. ``prompt_refine`` and ``t2i_cot``
    answers are explicit prompts (``a photo of ...``); ``reflect`` answers ``correct`` or ``edit: <instruction>``.
    """
    parsed = parse_response(text)
    if parsed is None:
        return False
    answer = parsed[1].strip()
    if task in ("prompt_refine", "t2i_cot"):
        return answer.startswith("a photo of ") and len(answer) > len("a photo of ")
    if task == "reflect":
        return answer == "correct" or (answer.startswith("edit: ") and len(answer) > len("edit: "))
    return bool(answer)


@torch.no_grad()
def evaluate_lm_format(model: UnifiedModel, data: Mapping[str, Sequence[LMExample]], per_task: int,
                       max_new_tokens: int = 64, batch_size: int = 32) -> dict[str, dict[str, float]]:
    """Greedy completions of the first ``per_task`` held-out prompts of each task: format rate and exact answers."""
    out: dict[str, dict[str, float]] = {}
    for task, examples in data.items():
        ex = list(examples[:per_task])
        texts: list[str] = []
        for i in range(0, len(ex), batch_size):
            chunk = ex[i:i + batch_size]
            images = [e.image for e in chunk] if any(e.image is not None for e in chunk) else None
            texts += model.generate_text([e.prompt for e in chunk], images, max_new_tokens=max_new_tokens,
                                         temperature=0.0)
        ok = [format_ok(task, t) for t in texts]
        exact = [(parse_response(t) or ("", None))[1] == (parse_response(e.response) or ("", ""))[1]
                 for t, e in zip(texts, ex)]
        out[task] = {"format_rate": float(np.mean(ok)), "answer_exact": float(np.mean(exact)), "n": len(ex),
                     "example": texts[0] if texts else ""}
    return out
