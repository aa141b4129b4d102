"""Scenario ``edit``: source image + instruction -> i2i queries + reference path -> edited image, with a cycle.

The four steps (DESIGN.md section 2):

* **rollout**: forward edit: the source image goes through the LM's vision tower with the instruction and the
  ``i2i`` queries (once per prompt, repeated ``G`` times) and, as noised reference latents, through the DiT's
  reference path; the DiT samples ``G`` edits with the SDE. Reverse edit: each edited image (vision tower +
  reference path, one conditioning per sample) with the reverse instruction is edited back, also with the SDE,
  on the same window steps. Both use the triple CFG ``v_null + w_ref (v_ref - v_null) + w (v_txt - v_ref)`` with
  the SAME scales, steps and stored noised reference latents as the loss.
* **score**: the weighted rewards of ``rl.rewards``; ``cycle_consistency`` is computed on the reconstructions
  (reverse edits, against the source image), every other reward on the forward edits (default:
  ``edit_correctness`` = verifier on the target metadata + preservation, see :mod:`unirl.rewards.image`).
* **advantages**: group-normalised over the G edits of a prompt; the forward AND the reverse trajectory of a
  sample get that sample's advantage.
* **loss**: one Flow-GRPO loss over the stored transitions of both trajectories, replayed together in ONE batched
  DiT pass (:func:`unirl.rl.dm_policy.dm_loss`). Trained: DiT + connector + ``i2i`` queries + reference path.

Evaluation: held-out test edits, Euler ODE with the rollout's CFG and one fixed seed per edit: ``edit_correctness``
(the headline: mean of the reward above), ``edit_correct`` (verifier ``correct`` on the target and every
untouched object preserved), and per operation (``correctness/<op>``).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from unirl.data import verifier
from unirl.rewards.image import edit_terms
from unirl.rewards.registry import combine
from unirl.rl.dm_policy import DMRollout, dm_rollout
from unirl.rl.scenario import DMScenarioBase, Rollout

__all__ = ["CYCLE_REWARDS", "SCENARIO", "EditScenario"]

CYCLE_REWARDS = frozenset({"cycle_consistency"})  # rewards scored on the reverse edits (reconstructions)


class EditScenario(DMScenarioBase):
    name = "edit"
    train_mode = "edit"

    # --- rollout ---
    def rollout(self, model: Any, ref_model: Any, prompts: list[dict], group_size: int,
                generator: torch.Generator) -> Rollout:
        sampling = self.sampling(model)
        src = [p["images"]["src.png"] for p in prompts]
        fwd = dm_rollout(model, [p["prompt"] for p in prompts], src, "i2i", group_size, sampling, generator,
                         ref_images=src)
        edited = model.decode_latents(fwd.final)  # B images
        reverse_texts = [p["reverse_prompt"] for p in prompts for _ in range(group_size)]
        rev = dm_rollout(model, reverse_texts, edited, "i2i", 1, sampling, generator, ref_images=edited,
                         window=fwd.window)
        return Rollout(prompts=list(prompts), group_size=group_size, dm=fwd, images=edited,
                       extras={"reverse": rev, "reconstructions": model.decode_latents(rev.final)})

    # --- score ---
    def score(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, list[float]]]:
        metas = rollout.sample_metas()
        texts = [m["prompt"] for m in metas]
        sources = [m["images"]["src.png"] for m in metas]
        weights = dict(self.cfg.rewards)
        forward = {k: v for k, v in weights.items() if k not in CYCLE_REWARDS}
        cycle = {k: v for k, v in weights.items() if k in CYCLE_REWARDS}
        total = torch.zeros(len(metas), dtype=torch.float32)
        parts: dict[str, list[float]] = {}
        if forward:
            t, p = combine(forward, rollout.images, texts, metas)
            total += torch.tensor(t)
            parts |= p
        if cycle:
            cyc_meta = [{**m, "source_image": s} for m, s in zip(metas, sources)]
            rev_texts = [m["reverse_prompt"] for m in metas]
            t, p = combine(cycle, rollout.extras["reconstructions"], rev_texts, cyc_meta)
            total += torch.tensor(t)
            parts |= p
        return total, parts  # (B,)

    # --- loss: DMScenarioBase.loss, one Flow-GRPO loss over both trajectories ---
    def dm_trajectories(self, rollout: Rollout,
                        advantages: torch.Tensor) -> tuple[list[DMRollout], list[torch.Tensor]]:
        """The forward and the reverse edits, each sample's advantage on both."""
        return [rollout.dm, rollout.extras["reverse"]], [advantages, advantages]

    # --- evaluation ---
    def generate(self, model: Any, prompts: list[dict], seed: int) -> list:
        """ODE edits of ``prompts`` (seed ``seed + i`` for edit i), in batches of ``eval_batch_size``."""
        return self.ode_images(model, [p["prompt"] for p in prompts], [seed + i for i in range(len(prompts))],
                               sources=[p["images"]["src.png"] for p in prompts])

    @torch.no_grad()
    def evaluate(self, model: Any, prompts: list[dict], seed: int) -> dict[str, float]:
        images = self.generate(model, prompts, seed)
        by_op: dict[str, list[float]] = defaultdict(list)
        scores, correct = [], []
        for im, p in zip(images, prompts):
            terms = edit_terms(im, p)
            s = sum(terms.values()) / len(terms)
            ok = bool(verifier.score(im, p["metadata"])["correct"]) and all(v == 1.0 for v in terms.values())
            scores.append(s)
            correct.append(float(ok))
            by_op[p["edit"]["op"]].append(s)
        out = {"edit_correctness": sum(scores) / len(scores), "edit_correct": sum(correct) / len(correct)}
        for op in sorted(by_op):
            out[f"correctness/{op}"] = sum(by_op[op]) / len(by_op[op])
        return out

    @torch.no_grad()
    def preview(self, model: Any, prompts: list[dict], seed: int) -> tuple[list, list[str]]:
        return self.generate(model, prompts, seed), [p["prompt"] for p in prompts]


SCENARIO = EditScenario
