"""Scenario ``understand``: image + question (vision tower) or a text problem -> think + answer completion.

The four steps (DESIGN.md section 2):

* **rollout**: the question (``meta["prompt"]``, the same user turn the SFT stage trained on) with its image
  (``png``, through the LM's vision tower; arithmetic problems have none) is repeated ``G`` times and the LM samples
  ``G`` completions at ``rl.temperature`` (:func:`unirl.rl.lm_policy.lm_rollout`: old and reference log-probs
  recorded under ``no_grad``).
* **score**: ``rl.rewards`` on the completions (default ``answer_accuracy`` against ``meta["answer"]`` + ``format``).
* **advantages**: group-normalised (:func:`unirl.rl.grpo.group_advantages`).
* **loss**: the token-level LM GRPO loss (:func:`unirl.rl.lm_policy.lm_loss`, PPO clip ``rl.clip_eps_lm``, k3 KL
  with ``rl.beta_lm``). Trained: the LM and its vision tower; the DM side is frozen.

Evaluation: held-out test questions, greedy decoding (deterministic: ``seed`` is unused):
``answer_accuracy`` (the headline), ``format`` and ``accuracy/<tag>`` per question family.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from unirl.rewards.text import answer_accuracy, format_reward
from unirl.rl.lm_policy import lm_loss, lm_rollout
from unirl.rl.scenario import Rollout, ScenarioBase

__all__ = ["SCENARIO", "UnderstandScenario", "greedy_texts"]


def greedy_texts(model: Any, prompts: list[str], images: list | None, max_new_tokens: int,
                 batch_size: int) -> list[str]:
    """Greedy (temperature 0) completions in batches of ``batch_size``."""
    out: list[str] = []
    bs = max(1, batch_size)
    for i in range(0, len(prompts), bs):
        ims = images[i : i + bs] if images is not None else None
        out += model.sample_text(prompts[i : i + bs], ims, max_new_tokens=max_new_tokens, temperature=0.0).texts
    return out


class UnderstandScenario(ScenarioBase):
    name = "understand"
    train_mode = "lm"
    eval_uses_seed = False

    @staticmethod
    def inputs(prompts: list[dict]) -> tuple[list[str], list | None]:
        """The LM's user turns and images (None for text problems; None overall when no prompt has one)."""
        images = [p.get("images", {}).get("png") for p in prompts]
        return [p["prompt"] for p in prompts], images if any(im is not None for im in images) else None

    # --- rollout ---
    def rollout(self, model: Any, ref_model: Any, prompts: list[dict], group_size: int,
                generator: torch.Generator) -> Rollout:
        texts, images = self.inputs(prompts)
        lm = lm_rollout(model, ref_model, texts, images, group_size, self.cfg.temperature, self.cfg.max_new_tokens,
                        generator, beta=self.cfg.beta_lm)
        return Rollout(prompts=list(prompts), group_size=group_size, lm=lm, texts=lm.texts)

    # --- score ---
    def reward_inputs(self, rollout: Rollout) -> tuple[list[str], list[str], list[dict]]:
        metas = rollout.sample_metas()
        return rollout.texts, [m["prompt"] for m in metas], metas

    # --- loss ---
    def loss(self, model: Any, ref_model: Any, rollout: Rollout, advantages: torch.Tensor,
             update_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        return lm_loss(model, rollout.lm, advantages, self.cfg.clip_eps_lm, self.cfg.beta_lm, update_index)

    # --- evaluation ---
    @torch.no_grad()
    def evaluate(self, model: Any, prompts: list[dict], seed: int) -> dict[str, float]:
        texts, images = self.inputs(prompts)
        completions = greedy_texts(model, texts, images, self.cfg.max_new_tokens, self.cfg.eval_batch_size)
        acc = answer_accuracy(completions, texts, prompts)
        fmt = format_reward(completions, texts, prompts)
        out = {"answer_accuracy": sum(acc) / len(acc), "format": sum(fmt) / len(fmt)}
        by_tag: dict[str, list[float]] = defaultdict(list)
        for p, a in zip(prompts, acc):
            by_tag[p["tag"]].append(a)
        out |= {f"accuracy/{t}": sum(v) / len(v) for t, v in sorted(by_tag.items())}
        return out


SCENARIO = UnderstandScenario
