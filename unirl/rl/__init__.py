"""GRPO engine: shared maths (``grpo``), the Flow-GRPO SDE step (``flow_sde``), rollouts and the six scenarios."""

from unirl.rl.flow_sde import (
    dm_grpo_loss,
    dm_kl,
    ode_step,
    sde_log_prob,
    sde_mean_std,
    sde_noise_scale,
    sde_step,
    sde_window,
)
from unirl.rl.grpo import completion_mask, group_advantages, k3_kl, lm_grpo_loss, ppo_clip_objective

__all__ = [
    "completion_mask",
    "dm_grpo_loss",
    "dm_kl",
    "group_advantages",
    "k3_kl",
    "lm_grpo_loss",
    "ode_step",
    "ppo_clip_objective",
    "sde_log_prob",
    "sde_mean_std",
    "sde_noise_scale",
    "sde_step",
    "sde_window",
]
