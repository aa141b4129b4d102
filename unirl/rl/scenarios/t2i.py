"""Scenario ``t2i``: prompt -> LM + t2i queries (no text sampled) -> DM SDE rollout -> verifier reward.

The four steps (DESIGN.md section 2):

* **rollout**: the prompt goes through the LM with the ``t2i`` queries and the connector ONCE per prompt; the
  conditioning is repeated ``G`` times and the DiT samples ``G`` images with the Flow-GRPO SDE on the window
  steps (:func:`unirl.rl.dm_policy.dm_rollout`).
* **score**: ``rl.rewards`` (default the verifier's GenEval partial score, ``geneval``) on the decoded images.
* **advantages**: group-normalised (:func:`unirl.rl.grpo.group_advantages`).
* **loss**: Flow-GRPO on every stored transition, replayed in one batched DiT pass with the conditioning
  recomputed with gradient (:func:`unirl.rl.dm_policy.dm_loss`). Trained: DiT + connector + ``t2i`` queries; the
  LM is frozen but the gradient flows through it into the queries.

Evaluation: held-out test prompts, Euler ODE sampling with the rollout's CFG and one fixed seed per prompt
(``eval_seed + index``), judged by the verifier: ``geneval_score`` (overall partial score; the headline),
``geneval_correct`` (binary), and both per task family (``score/<tag>``, ``correct/<tag>``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from unirl.data import verifier
from unirl.rl.dm_policy import dm_rollout
from unirl.rl.scenario import DMScenarioBase, Rollout

__all__ = ["SCENARIO", "T2IScenario", "geneval_metrics"]


def geneval_metrics(results: list[dict[str, Any]], tags: list[str]) -> dict[str, float]:
    """Overall and per-tag verifier means: ``geneval_score`` (headline), ``geneval_correct``, per tag both."""
    by_tag: dict[str, list[dict]] = defaultdict(list)
    for r, t in zip(results, tags):
        by_tag[t].append(r)
    out = {"geneval_score": sum(float(r["score"]) for r in results) / len(results),
           "geneval_correct": sum(float(bool(r["correct"])) for r in results) / len(results)}
    for t in sorted(by_tag):
        rs = by_tag[t]
        out[f"score/{t}"] = sum(float(r["score"]) for r in rs) / len(rs)
        out[f"correct/{t}"] = sum(float(bool(r["correct"])) for r in rs) / len(rs)
    return out


class T2IScenario(DMScenarioBase):
    name = "t2i"
    train_mode = "t2i"

    # --- rollout ---
    def rollout(self, model: Any, ref_model: Any, prompts: list[dict], group_size: int,
                generator: torch.Generator) -> Rollout:
        texts = [p["prompt"] for p in prompts]
        dm = dm_rollout(model, texts, None, "t2i", group_size, self.sampling(model), generator)
        return Rollout(prompts=list(prompts), group_size=group_size, dm=dm, images=model.decode_latents(dm.final))

    # --- score ---
    def reward_inputs(self, rollout: Rollout) -> tuple[list, list[str], list[dict]]:
        metas = rollout.sample_metas()
        return rollout.images, [m["prompt"] for m in metas], metas

    # --- loss: DMScenarioBase.loss, Flow-GRPO on rollout.dm ---

    # --- evaluation ---
    def generate(self, model: Any, prompts: list[dict], seed: int) -> list:
        """ODE samples for ``prompts`` (seed ``seed + i`` for prompt i), in batches of ``eval_batch_size``."""
        return self.ode_images(model, [p["prompt"] for p in prompts], [seed + i for i in range(len(prompts))])

    @torch.no_grad()
    def evaluate(self, model: Any, prompts: list[dict], seed: int) -> dict[str, float]:
        images = self.generate(model, prompts, seed)
        results = verifier.score_batch(images, [p["metadata"] for p in prompts])
        return geneval_metrics(results, [p["tag"] for p in prompts])

    @torch.no_grad()
    def preview(self, model: Any, prompts: list[dict], seed: int) -> tuple[list, list[str]]:
        return self.generate(model, prompts, seed), [p["prompt"] for p in prompts]


SCENARIO = T2IScenario
