"""The joint LM + DM scenarios' shared machinery (``t2i_cot``, ``reflect``): one rollout feeds both experts.

Variant implemented (DESIGN.md section 1 "Joint"):

* **score**: the configured rewards split between the experts' outputs: ``text_rewards`` (default
  :data:`~unirl.rl.lm_policy.TEXT_REWARDS`) on the LM completions, every other reward on the final images
  (:func:`unirl.rl.lm_policy.score_rewards`).
* **loss**: ONE joint loss ``L = L_LM + L_DM`` (one backward, by the loop) with the same advantage ``A_i`` for every
  LM token and every DM step of sample ``i``: ``L_LM`` is the token-level GRPO loss of the completions
  (:func:`unirl.rl.lm_policy.lm_loss`, ``rl.clip_eps_lm``, ``rl.beta_lm``), ``L_DM`` the Flow-GRPO loss of the
  scenario's DM trajectories (:meth:`unirl.rl.scenario.DMScenarioBase.dm_part`). Both experts' monitors are
  logged, prefixed ``lm/`` and ``dm/`` (:func:`prefixed`), with each part's value as ``lm/loss`` / ``dm/loss``.

A joint scenario subclasses :class:`JointScenarioBase` and implements ``rollout`` (LM then DM), ``evaluate`` and,
where its DM trajectories are not simply ``rollout.dm`` with all advantages, ``dm_trajectories``/``dm_part``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from unirl.rl.lm_policy import TEXT_REWARDS, lm_loss, score_rewards
from unirl.rl.scenario import DMScenarioBase, Rollout

if TYPE_CHECKING:  # pragma: no cover
    from unirl.models.unified import UnifiedModel

__all__ = ["JointScenarioBase", "prefixed"]


def prefixed(stats: dict[str, float], prefix: str) -> dict[str, float]:
    """``{"kl": x} -> {"<prefix>/kl": x}`` (the joint scenarios log both experts' monitors)."""
    return {f"{prefix}/{k}": v for k, v in stats.items()}


class JointScenarioBase(DMScenarioBase):
    """A scenario in which the LM and the DM both sample and both train: mixed rewards and the joint loss."""

    text_rewards: frozenset[str] = TEXT_REWARDS  # rewards scored on the completions; the others on images

    # --- score ---
    def score(self, rollout: Rollout) -> tuple[torch.Tensor, dict[str, list[float]]]:
        metas = rollout.sample_metas()
        return score_rewards(self.cfg.rewards, rollout.texts, rollout.images, [m["prompt"] for m in metas], metas,
                             self.text_rewards)

    # --- loss ---
    def lm_part(self, model: UnifiedModel, rollout: Rollout, advantages: torch.Tensor,
                update_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        """L_LM: the token-level GRPO loss of the completions."""
        return lm_loss(model, rollout.lm, advantages, self.cfg.clip_eps_lm, self.cfg.beta_lm, update_index)

    def loss(self, model: UnifiedModel, ref_model: UnifiedModel, rollout: Rollout, advantages: torch.Tensor,
             update_index: int) -> tuple[torch.Tensor, dict[str, float]]:
        l_lm, s_lm = self.lm_part(model, rollout, advantages, update_index)
        l_dm, s_dm = self.dm_part(model, ref_model, rollout, advantages, update_index)
        stats = prefixed(s_lm, "lm") | prefixed(s_dm, "dm")
        stats |= {"lm/loss": float(l_lm.detach()), "dm/loss": float(l_dm.detach())}
        return l_lm + l_dm, stats
