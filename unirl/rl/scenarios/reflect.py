"""Scenario ``reflect``: prompt + an image -> the LM judges it (``correct`` or an edit) -> the DM applies the edit.

The four steps (DESIGN.md sections 1 "Joint" and 2):

* **rollout**: each prompt comes with the image to judge: the curated render (correct, or violating one clause of
  the prompt), or, with probability ``own_generation_share``, the policy's own T2I generation of the prompt (ODE,
  no gradient), whose ground-truth verdict is then the verifier's (``correct`` iff the verifier judges it so).
  The prompt (``meta["prompt"]``, the SFT user turn) and the image (vision tower) are repeated ``G`` times and the
  LM samples ``G`` judgements ``<think>…</think><answer>correct | edit: <instruction></answer>``
  (:func:`unirl.rl.lm_policy.lm_rollout`). Every sample that asks for an edit has it applied by the DM: the
  instruction with the judged image (vision tower + ``i2i`` queries, and the reference path) and the Flow-GRPO SDE
  (:func:`unirl.rl.dm_policy.dm_rollout`, one conditioning unit per editing sample, triple CFG as in ``edit``).
  The final image is the edit, or the judged image unchanged when the LM answers ``correct``.
* **score**: ``rl.rewards``: ``geneval`` (verifier partial score of the FINAL image against the prompt's GenEval
  metadata) + ``judgement`` (the verdict matches the ground truth, :mod:`unirl.rewards.judge`) + ``format``.
* **advantages**: group-normalised; the same ``A_i`` for the LM tokens and the DM steps of sample ``i``.
* **loss**: ONE joint loss ``L_LM + L_DM`` (one backward; :class:`unirl.rl.joint.JointScenarioBase`): the LM GRPO
  loss on all ``B`` judgements plus the Flow-GRPO loss on the transitions of the samples that were edited (none:
  ``L_DM = 0``). The replay re-encodes instruction + image + ``i2i`` queries with gradient, so the DM loss also
  reaches the LM (and its vision tower). Trained: LM + vision tower + DiT + connector + ``i2i`` queries + reference
  path; learning rates ``rl.lr_lm`` and ``rl.lr_dm``.

Evaluation: held-out curated samples, greedy judgements, ODE edits with one fixed seed per sample (``seed + i``):
``judgement_accuracy`` (headline), ``final_score`` / ``uncorrected_score`` (verifier partial score of the final
image / of the judged image), ``final_minus_uncorrected``, their binary versions, ``format``, ``edit_rate`` and
``judgement/<tag>`` (accuracy on correct and on flawed images).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from unirl.data import verifier
from unirl.rewards.judge import judgement_reward, parse_judgement
from unirl.rewards.text import format_reward
from unirl.rl.dm_policy import DMRollout, dm_rollout, sample_ode
from unirl.rl.joint import JointScenarioBase
from unirl.rl.lm_policy import LMRollout, lm_rollout
from unirl.rl.scenario import Rollout

__all__ = ["SCENARIO", "ReflectScenario"]


class ReflectScenario(JointScenarioBase):
    name = "reflect"
    train_mode = ["lm", "vision", "dit", "connector", "i2i_queries", "ref"]
    own_generation_share: float = 0.25  # share of prompts judged on the policy's own T2I image instead of a render

    def with_own_generations(self, model: Any, prompts: list[dict], generator: torch.Generator) -> list[dict]:
        """Replace the image of about ``own_generation_share`` of the prompts by the policy's own T2I sample."""
        draws = torch.rand(len(prompts), generator=generator).tolist()
        own = [i for i, u in enumerate(draws) if u < self.own_generation_share]
        out = [dict(p) for p in prompts]
        if not own:
            return out
        seeds = torch.randint(0, 2**31 - 1, (len(own),), generator=generator).tolist()
        latents = sample_ode(model, [prompts[i]["prompt"] for i in own], None, "t2i", seeds, self.sampling(model))
        for i, im in zip(own, model.decode_latents(latents)):
            ok = bool(verifier.score(im, prompts[i]["metadata"])["correct"])
            out[i] |= {"images": {"png": im}, "verdict": "correct" if ok else "incorrect", "instruction": "",
                       "tag": "own_correct" if ok else "own_flawed"}
        return out

    # --- rollout ---
    def rollout(self, model: Any, ref_model: Any, prompts: list[dict], group_size: int,
                generator: torch.Generator) -> Rollout:
        prompts = self.with_own_generations(model, prompts, generator)
        judged = [p["images"]["png"] for p in prompts]
        lm = lm_rollout(model, ref_model, [p["prompt"] for p in prompts], judged, group_size, self.cfg.temperature,
                        self.cfg.max_new_tokens, generator, beta=self.cfg.beta_lm)
        return self.apply_judgements(model, prompts, group_size, lm, generator)

    def apply_judgements(self, model: Any, prompts: list[dict], group_size: int, lm: LMRollout,
                         generator: torch.Generator) -> Rollout:
        """The DM half of the rollout: every judgement asking for an edit has it applied (SDE, stored steps)."""
        parsed = [parse_judgement(t) for t in lm.texts]
        edit_index = [i for i, v in enumerate(parsed) if v is not None and v[0] == "incorrect"]
        finals = list(lm.images)
        dm = None
        if edit_index:
            src = [lm.images[i] for i in edit_index]
            dm = dm_rollout(model, [parsed[i][1] for i in edit_index], src, "i2i", 1, self.sampling(model),
                            generator, ref_images=src)
            for i, im in zip(edit_index, model.decode_latents(dm.final)):
                finals[i] = im
        return Rollout(prompts=list(prompts), group_size=group_size, lm=lm, dm=dm, images=finals, texts=lm.texts,
                       extras={"edit_index": edit_index})

    # --- score: JointScenarioBase (mixed rewards) ---

    # --- loss: JointScenarioBase's L_LM + L_DM, the DM part on the edited samples only ---
    def dm_trajectories(self, rollout: Rollout,
                        advantages: torch.Tensor) -> tuple[list[DMRollout], list[torch.Tensor]]:
        """The edits' trajectories, with the advantages of the samples that asked for them."""
        idx = torch.tensor(rollout.extras["edit_index"], device=advantages.device)
        return [rollout.dm], [advantages[idx]]

    def dm_part(self, model: Any, ref_model: Any, rollout: Rollout, advantages: torch.Tensor,
                update_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L_DM: Flow-GRPO on the edited samples' transitions (0 when no sample asked for an edit)."""
        if rollout.dm is None:
            return advantages.new_zeros(()), {}
        return super().dm_part(model, ref_model, rollout, advantages, update_index)

    def loss(self, model: Any, ref_model: Any, rollout: Rollout, advantages: torch.Tensor,
             update_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        total, stats = super().loss(model, ref_model, rollout, advantages, update_index)
        stats["edit_fraction"] = len(rollout.extras["edit_index"]) / max(rollout.batch_size, 1)
        return total, stats

    # --- evaluation ---
    def judge_and_correct(self, model: Any, prompts: list[dict], seed: int) -> tuple[list[str], list]:
        """Greedy judgements and the final images (ODE edit with seed ``seed + i``, or the judged image)."""
        texts: list[str] = []
        finals: list = []
        for i, chunk in self.eval_batches(prompts):
            judged = [p["images"]["png"] for p in chunk]
            out = model.sample_text([p["prompt"] for p in chunk], judged, max_new_tokens=self.cfg.max_new_tokens,
                                    temperature=0.0).texts
            parsed = [parse_judgement(t) for t in out]
            idx = [j for j, v in enumerate(parsed) if v is not None and v[0] == "incorrect"]
            final = list(judged)
            if idx:
                edits = self.ode_images(model, [parsed[j][1] for j in idx], [seed + i + j for j in idx],
                                        sources=[judged[j] for j in idx])
                for j, im in zip(idx, edits):
                    final[j] = im
            texts += out
            finals += final
        return texts, finals

    @torch.no_grad()
    def evaluate(self, model: Any, prompts: list[dict], seed: int) -> dict[str, float]:
        texts, finals = self.judge_and_correct(model, prompts, seed)
        user = [p["prompt"] for p in prompts]
        judged_ok = judgement_reward(texts, user, prompts)
        mds = [p["metadata"] for p in prompts]
        after = verifier.score_batch(finals, mds)
        before = verifier.score_batch([p["images"]["png"] for p in prompts], mds)
        n = len(prompts)

        def mean(rs: list[dict], key: str) -> float:
            return sum(float(r[key]) for r in rs) / n

        parsed = [parse_judgement(t) for t in texts]
        out = {
            "judgement_accuracy": sum(judged_ok) / n,
            "final_score": mean(after, "score"),
            "uncorrected_score": mean(before, "score"),
            "final_minus_uncorrected": mean(after, "score") - mean(before, "score"),
            "final_correct": mean(after, "correct"),
            "uncorrected_correct": mean(before, "correct"),
            "format": sum(format_reward(texts, user, prompts)) / n,
            "edit_rate": sum(v is not None and v[0] == "incorrect" for v in parsed) / n,
        }
        by_tag: dict[str, list[float]] = defaultdict(list)
        for p, ok in zip(prompts, judged_ok):
            by_tag[p["tag"]].append(ok)
        out |= {f"judgement/{t}": sum(v) / len(v) for t, v in sorted(by_tag.items())}
        return out

    @torch.no_grad()
    def preview(self, model: Any, prompts: list[dict], seed: int) -> tuple[list, list[str]]:
        texts, finals = self.judge_and_correct(model, prompts, seed)
        captions = []
        for t in texts:
            v = parse_judgement(t)
            captions.append("(malformed)" if v is None else v[0] if v[0] == "correct" else f"edit: {v[1]}")
        return finals, captions


SCENARIO = ReflectScenario
