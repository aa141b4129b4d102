"""Training and held-out prompts for the RL scenarios: loaded from the curated shards and drawn balanced over tags.

Shards store a task's samples tag by tag and the held-out metrics average over tags, so both the evaluation subset
(:func:`balanced`) and each step's training draw (:func:`sample_prompts`) visit the tags evenly.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

__all__ = ["balanced", "load_prompts", "sample_prompts"]


def balanced(prompts: list[dict], n: int) -> list[dict]:
    """The first ``n`` prompts taken round-robin over their tags (tags sorted; shard order within a tag).

    Shards store a task's samples tag by tag, so the first ``n`` in file order would all share one tag.
    """
    by_tag: dict[str, list[dict]] = {}
    for p in prompts:
        by_tag.setdefault(str(p.get("tag", "")), []).append(p)
    queues = [by_tag[t] for t in sorted(by_tag)]
    out: list[dict] = []
    i = 0
    while len(out) < min(n, len(prompts)):
        for q in queues:
            if i < len(q) and len(out) < n:
                out.append(q[i])
        i += 1
    return out


def load_prompts(shards_dir: str | os.PathLike, task: str, split: str, limit: int | None = None) -> list[dict]:
    """Shard samples as prompt dicts: the sample's meta plus ``key`` and ``images`` (extension -> PIL image).

    ``limit`` keeps that many, balanced over tags (:func:`balanced`).
    """
    from unirl.data.shards import read_samples

    task_dir = Path(shards_dir) / task
    if not task_dir.is_dir():
        raise FileNotFoundError(f"no shards for task {task!r} at {task_dir}: run `unirl curate` (dvc repro curate)")
    out = []
    for s in read_samples(task_dir, split):
        out.append({**s.meta, "key": s.key, "images": dict(s.images)})
    if not out:
        raise FileNotFoundError(f"no {split!r} samples in {task_dir}: run `unirl curate` (dvc repro curate)")
    return balanced(out, limit) if limit is not None else out


def sample_prompts(prompts: list[dict], n: int, rng: random.Random, balance_tags: bool = True) -> list[dict]:
    """``n`` distinct training prompts. ``balance_tags``: tags are visited in a random order (cycling when ``n``
    exceeds their number) and one prompt is drawn per visit, so every tag is trained equally often whatever its
    share of the shards (the held-out metric averages over tags); otherwise uniformly over prompts."""
    n = min(n, len(prompts))
    if not balance_tags:
        return [prompts[i] for i in rng.sample(range(len(prompts)), n)]
    by_tag: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        by_tag.setdefault(str(p.get("tag", "")), []).append(i)
    tags = sorted(by_tag)
    rng.shuffle(tags)
    chosen: list[int] = []
    k = 0
    while len(chosen) < n:
        pool = [i for i in by_tag[tags[k % len(tags)]] if i not in chosen]
        if pool:
            chosen.append(rng.choice(pool))
        k += 1
    return [prompts[i] for i in chosen]
