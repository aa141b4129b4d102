"""Scenario ``prompt_refine``: user prompt -> the LM rewrites it -> the FROZEN generator draws it -> verifier + format.

The four steps (DESIGN.md section 2; the default reward is ``geneval_complete``, not GenEval's partial score,
which the LM learns to game by leaving objects out: :func:`unirl.rewards.image.geneval_complete`):

* **rollout**: the casual request (``meta["prompt"]``) is repeated ``G`` times and the LM samples ``G`` rewrites
  (:func:`unirl.rl.lm_policy.lm_rollout`); the rewrite is the ``<answer>`` content. The frozen generator then draws
  one image per rewrite with the deterministic Euler ODE and the model's CFG (:func:`unirl.rl.dm_policy.sample_ode`,
  ``rl.eval_steps`` steps, 0 meaning ``rl.sde_steps``, exactly as in evaluation; no SDE, no DM log-probs). All
  ``G`` rewrites of a prompt share one noise seed, so the group's reward differences come from the rewrites alone
  (common random numbers), and identical rewrites are drawn once. A completion without an ``<answer>`` gets the
  blank canvas (verifier score 0) instead of an image.
* **score**: ``rl.rewards``: ``geneval`` (the verifier's partial score against the prompt's GenEval metadata) on the
  images + ``format`` on the completions.
* **advantages**: group-normalised.
* **loss**: the LM GRPO loss only (:func:`unirl.rl.lm_policy.lm_loss`). Trained: the LM.

"The frozen DM" is the whole T2I path of the *reference* model (its LM encoding of the rewrite + queries, connector
and DiT), i.e. the initial (SFT) model: the DM's conditioning runs through the LM, so generating with the policy
would let LM updates shift the generator; the reference never changes, so nothing on the image side can. The
policy's own DM parameters are frozen too (``train_mode = "lm"``; the test checks they do not change).

Evaluation: held-out requests, greedy rewrites, images from the frozen generator with one fixed seed per request
(``seed + i``): ``geneval_score`` (partial score of the rewrites' images; the headline), ``raw_geneval_score``
(the same generator and seeds on the raw requests), ``gain_over_raw`` (their difference), the binary versions,
``format``, and per task family ``score/<tag>`` and ``raw_score/<tag>`` (a rewrite that drops a requested object
can still earn the partial score's credit for the other; the per-family figures show where a gain comes from).
Verifier results are cached per (text, prompt, seed): the generator being fixed, the raw requests are drawn once
per run and a rewrite only when it is new. The frozen generator is the reference model passed to
``rollout``; an evaluation before any rollout (the "before" one) loads the same initial model from ``rl.init_dir``.
"""

from __future__ import annotations

from typing import Any

import torch

from unirl.data import verifier
from unirl.data.shapes import Scene, render
from unirl.rewards.text import extract_answer, format_reward
from unirl.rl.dm_policy import DMSampling, ode_images
from unirl.rl.lm_policy import TEXT_REWARDS, lm_loss, lm_rollout, score_rewards
from unirl.rl.scenario import Rollout, ScenarioBase
from unirl.rl.scenarios.t2i import geneval_metrics
from unirl.rl.scenarios.understand import greedy_texts

__all__ = ["SCENARIO", "PromptRefineScenario"]


class PromptRefineScenario(ScenarioBase):
    name = "prompt_refine"
    train_mode = "lm"
    text_rewards: frozenset[str] = TEXT_REWARDS  # rewards scored on the completions; the others on images

    def __init__(self, cfg: Any) -> None:
        super().__init__(cfg)
        self.generator_model: Any = None  # the frozen generator (the reference model), set by the first rollout
        self._scores: dict[tuple[str, str, int], dict] = {}  # (text, metadata prompt, seed) -> verifier result

    def draw(self, generator_model: Any, texts: list[str | None], seeds: list[int]) -> list:
        """ODE images of ``texts`` from ``generator_model`` (one seed each); None texts give the blank canvas.

        Equal (text, seed) pairs (a group's identical rewrites share its seed) are drawn once: the ODE is
        deterministic, so their images are identical anyway.
        """
        blank = render(Scene(()), generator_model.config.resolution)
        unique = list(dict.fromkeys((t, s) for t, s in zip(texts, seeds) if t))
        images = ode_images(generator_model, [t for t, _ in unique], [s for _, s in unique],
                            DMSampling.from_config(self.cfg, generator_model), self.cfg.eval_batch_size,
                            steps=self.cfg.eval_steps or None)
        drawn = dict(zip(unique, images))
        return [drawn[(t, s)] if t else blank for t, s in zip(texts, seeds)]

    # --- rollout ---
    def rollout(self, model: Any, ref_model: Any, prompts: list[dict], group_size: int,
                generator: torch.Generator) -> Rollout:
        self.generator_model = ref_model
        lm = lm_rollout(model, ref_model, [p["prompt"] for p in prompts], None, group_size, self.cfg.temperature,
                        self.cfg.max_new_tokens, generator, beta=self.cfg.beta_lm)
        rewrites = [extract_answer(t) for t in lm.texts]
        prompt_seeds = torch.randint(0, 2**31 - 1, (len(prompts),), generator=generator).tolist()
        seeds = [s for s in prompt_seeds for _ in range(group_size)]  # one seed per group
        images = self.draw(ref_model, rewrites, seeds)
        return Rollout(prompts=list(prompts), group_size=group_size, lm=lm, images=images, texts=lm.texts,
                       extras={"rewrites": rewrites})

    # --- score ---
    def score(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, list[float]]]:
        metas = rollout.sample_metas()
        return score_rewards(self.cfg.rewards, rollout.texts, rollout.images, [m["prompt"] for m in metas], metas,
                             self.text_rewards)

    # --- loss ---
    def loss(self, model: Any, ref_model: Any, rollout: Rollout, advantages: torch.Tensor,
             update_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        return lm_loss(model, rollout.lm, advantages, self.cfg.clip_eps_lm, self.cfg.beta_lm, update_index)

    # --- evaluation ---
    def frozen_generator(self, device: Any = None) -> Any:
        """The reference model once a rollout has passed it; before that, the initial model from ``rl.init_dir``."""
        if self.generator_model is None:
            from unirl.models.unified import UnifiedModel

            model = UnifiedModel.from_pretrained(self.cfg.init_dir, device=device)
            self.generator_model = model.requires_grad_(False).eval()
        return self.generator_model

    def rewrite(self, model: Any, prompts: list[dict]) -> tuple[list[str], list[str | None]]:
        """Greedy completions and their rewrites (the ``<answer>`` content, None when missing)."""
        texts = greedy_texts(model, [p["prompt"] for p in prompts], None, self.cfg.max_new_tokens,
                             self.cfg.eval_batch_size)
        return texts, [extract_answer(t) for t in texts]

    @torch.no_grad()
    def evaluate(self, model: Any, prompts: list[dict], seed: int) -> dict[str, float]:
        gen = self.frozen_generator(model.device)
        texts, rewrites = self.rewrite(model, prompts)
        seeds = [seed + i for i in range(len(prompts))]
        refined = self.scores(gen, rewrites, prompts, seeds)
        raw = self.scores(gen, [p["prompt"] for p in prompts], prompts, seeds)

        fmt = format_reward(texts, [p["prompt"] for p in prompts], prompts)
        tags = [p["tag"] for p in prompts]
        ours, base = geneval_metrics(refined, tags), geneval_metrics(raw, tags)  # overall and per-tag means
        return {
            "geneval_score": ours["geneval_score"],
            "raw_geneval_score": base["geneval_score"],
            "gain_over_raw": ours["geneval_score"] - base["geneval_score"],
            "geneval_correct": ours["geneval_correct"],
            "raw_geneval_correct": base["geneval_correct"],
            "format": sum(fmt) / len(fmt),
            **{k: v for k, v in ours.items() if k.startswith("score/")},
            **{f"raw_{k}": v for k, v in base.items() if k.startswith("score/")},
        }

    def scores(self, gen: Any, texts: list[str | None], prompts: list[dict], seeds: list[int]) -> list[dict]:
        """Verifier results of the frozen generator's images of ``texts`` against each prompt's metadata.

        Cached per (text, prompt, seed): the generator never changes, so an image is drawn once per run (the raw
        requests' images in the first evaluation only, a rewrite's image only when the rewrite is new).
        """
        keys = [(t or "", p["metadata"]["prompt"], s) for t, p, s in zip(texts, prompts, seeds)]
        todo = [i for i, k in enumerate(keys) if k not in self._scores]
        if todo:
            images = self.draw(gen, [texts[i] for i in todo], [seeds[i] for i in todo])
            for i, im in zip(todo, images):
                self._scores[keys[i]] = verifier.score(im, prompts[i]["metadata"])
        return [self._scores[k] for k in keys]

    @torch.no_grad()
    def preview(self, model: Any, prompts: list[dict], seed: int) -> tuple[list, list[str]]:
        _, rewrites = self.rewrite(model, prompts)
        images = self.draw(self.frozen_generator(model.device), rewrites, [seed + i for i in range(len(prompts))])
        return images, [r or "(no rewrite)" for r in rewrites]


SCENARIO = PromptRefineScenario
