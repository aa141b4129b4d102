"""Scenario ``t2i_cot``: reasoning prompt -> the LM reasons and writes an explicit prompt -> the DM draws it.

The four steps (DESIGN.md sections 1 "Joint" and 2):

* **rollout**: the reasoning prompt (``meta["prompt"]``) is repeated ``G`` times and the LM samples ``G``
  completions ``<think>reasoning</think><answer>explicit prompt</answer>`` (:func:`unirl.rl.lm_policy.lm_rollout`).
  Each sample then conditions the DM on the LM's hidden states of the WHOLE sequence: prompt + its own completion +
  the ``t2i`` queries (``prefix_ids`` = the completion, so the queries attend to the reasoning and the explicit
  prompt), and the DiT samples one image with the Flow-GRPO SDE on the window steps
  (:func:`unirl.rl.dm_policy.dm_rollout`, one conditioning unit per sample).
* **score**: ``rl.rewards``: ``geneval`` (verifier partial score of the image against the GenEval metadata of the
  resolved scene) + ``format`` on the completion.
* **advantages**: group-normalised; the same ``A_i`` for every LM token and every DM step of sample ``i``.
* **loss**: ONE joint loss ``L = L_LM + L_DM`` (one backward, by the loop; :class:`unirl.rl.joint.JointScenarioBase`):
  the LM GRPO loss on the completion tokens (:func:`unirl.rl.lm_policy.lm_loss`) plus the Flow-GRPO loss on the
  stored transitions (:func:`unirl.rl.dm_policy.dm_loss`), whose replay re-encodes prompt + completion + queries
  WITH gradient, so the DM loss reaches the LM weights through the query hidden states. Trained: LM + DiT +
  connector + ``t2i`` queries, with separate learning rates (``rl.lr_lm`` for the LM group, ``rl.lr_dm`` for the DM
  group).

Evaluation: held-out reasoning prompts, greedy completions, Euler ODE images conditioned on prompt + completion +
queries with one fixed seed per prompt (``seed + i``): ``geneval_score`` (headline), ``geneval_correct``,
``format`` and ``score/<tag>`` per reasoning family.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from unirl.data import verifier
from unirl.rewards.text import format_reward
from unirl.rl.dm_policy import dm_rollout
from unirl.rl.joint import JointScenarioBase
from unirl.rl.lm_policy import LMRollout, lm_rollout
from unirl.rl.scenario import Rollout

__all__ = ["SCENARIO", "T2ICoTScenario"]


class T2ICoTScenario(JointScenarioBase):
    name = "t2i_cot"
    train_mode = ["lm", "dit", "connector", "t2i_queries"]

    # --- rollout ---
    def rollout(self, model: Any, ref_model: Any, prompts: list[dict], group_size: int,
                generator: torch.Generator) -> Rollout:
        lm = lm_rollout(model, ref_model, [p["prompt"] for p in prompts], None, group_size, self.cfg.temperature,
                        self.cfg.max_new_tokens, generator, beta=self.cfg.beta_lm)
        return self.draw(model, prompts, group_size, lm, generator)

    def draw(self, model: Any, prompts: list[dict], group_size: int, lm: LMRollout,
             generator: torch.Generator) -> Rollout:
        """The DM half of the rollout: one SDE image per sample, conditioned on prompt + completion + queries."""
        dm = dm_rollout(model, lm.prompts, None, "t2i", 1, self.sampling(model), generator,
                        prefix_ids=lm.completion_lists())
        return Rollout(prompts=list(prompts), group_size=group_size, lm=lm, dm=dm, texts=lm.texts,
                       images=model.decode_latents(dm.final))

    # --- score and loss: JointScenarioBase (mixed rewards; L_LM + L_DM on rollout.dm, re-encoded with gradient) ---

    # --- evaluation ---
    def generate(self, model: Any, prompts: list[dict], seed: int) -> tuple[list[str], list]:
        """Greedy completions and the images conditioned on them (seed ``seed + i`` for prompt i)."""
        texts: list[str] = []
        images: list = []
        for i, chunk in self.eval_batches([p["prompt"] for p in prompts]):
            out = model.sample_text(chunk, None, max_new_tokens=self.cfg.max_new_tokens, temperature=0.0)
            texts += out.texts
            images += self.ode_images(model, chunk, [seed + i + j for j in range(len(chunk))],
                                      prefix_ids=out.completion_ids)
        return texts, images

    @torch.no_grad()
    def evaluate(self, model: Any, prompts: list[dict], seed: int) -> dict[str, float]:
        texts, images = self.generate(model, prompts, seed)
        results = verifier.score_batch(images, [p["metadata"] for p in prompts])
        fmt = format_reward(texts, [p["prompt"] for p in prompts], prompts)
        n = len(results)
        out = {"geneval_score": sum(float(r["score"]) for r in results) / n,
               "geneval_correct": sum(float(bool(r["correct"])) for r in results) / n,
               "format": sum(fmt) / n}
        by_tag: dict[str, list[float]] = defaultdict(list)
        for p, r in zip(prompts, results):
            by_tag[p["tag"]].append(float(r["score"]))
        out |= {f"score/{t}": sum(v) / len(v) for t, v in sorted(by_tag.items())}
        return out

    @torch.no_grad()
    def preview(self, model: Any, prompts: list[dict], seed: int) -> tuple[list, list[str]]:
        _, images = self.generate(model, prompts, seed)
        return images, [p["prompt"] for p in prompts]


SCENARIO = T2ICoTScenario
