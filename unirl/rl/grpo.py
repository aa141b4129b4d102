"""GRPO maths shared by the LM and DM sides: group advantages, completion masks, k3 KL, the PPO-clipped LM loss.

Variant implemented (read this before the code):

- **Advantages** (``group_advantages``): ``A_i = clip((R_i - mean_g R) / (std_g R + 1e-4), -5, 5)`` over each run of
  ``group_size`` consecutive samples (sample ``i`` belongs to prompt ``i // group_size``, the order
  ``repeat_interleave`` gives). ``std_g`` is the *unbiased* sample std (Bessel's correction, ``torch.std``'s default),
  as UniRL-Zero's trainers compute it (``rewards.view(-1, G).std(dim=1)``); Flow-GRPO's ``PerPromptStatTracker`` uses
  ``np.std`` (population, ddof=0) instead. ``unbiased=False`` gives Flow-GRPO's form. The same ``A_i`` is used for
  every LM token and every DM step of sample ``i``; no per-prompt history, no global std.
- **LM loss** (``lm_grpo_loss``), DESIGN.md section 1 with a PPO clip:
  ``L = -(1/G) Σ_i (1/|y_i|) Σ_l [min(ρ_il A_i, clip(ρ_il, 1-ε, 1+ε) A_i) - β KL_il]`` where ``ρ = exp(ℓ - ℓ_old)``,
  ``|y_i|`` counts the completion tokens up to and including the first EOS (``completion_mask``), and
  ``KL = e^(ℓref-ℓ) - (ℓref-ℓ) - 1`` (Schulman's k3 estimator) to a frozen reference. Token-level sum per sequence,
  normalised by that sequence's length, then the mean over sequences (the DeepSeekMath/GRPO paper's normalisation;
  DAPO and nanochat instead normalise by the total token count). ``G`` here is the number of sequences in the batch.
- Where it differs from the paper: the paper's on-policy single update has no clip (ρ ≡ 1 with ``ℓ_old = ℓ.detach()``);
  we keep the clip so several inner updates per rollout batch are possible, and with ``old = new`` the clip is inactive
  and the gradient equals the paper's. UniRL-Zero hard-codes β_lm = 0.01; here β is an argument (from ``params.yaml``).
- ``ppo_clip_objective`` is the per-element PPO surrogate shared with the DM loss (``unirl.rl.flow_sde.dm_grpo_loss``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["completion_mask", "group_advantages", "k3_kl", "lm_grpo_loss", "ppo_clip_objective", "ratio_stats"]


def group_advantages(
    rewards: Tensor | Sequence[float],
    group_size: int,
    *,
    eps: float = 1e-4,
    clip: float = 5.0,
    unbiased: bool = True,
) -> Tensor:
    """Group-normalised advantages ``clip((R - mean_g) / (std_g + eps), -clip, clip)``; shape (B,) -> (B,).

    Groups are consecutive runs of ``group_size`` rewards. ``unbiased=True`` (default, UniRL-Zero's ``torch.std``)
    divides by ``G - 1``; ``unbiased=False`` by ``G`` (Flow-GRPO's ``np.std``). A group with identical rewards gets
    advantages of exactly 0.
    """
    r = torch.as_tensor(rewards)
    if not r.is_floating_point():
        r = r.to(torch.float32)
    if r.ndim != 1:
        raise ValueError(f"group_advantages expects rewards of shape (B,), got {tuple(r.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    B = r.shape[0]
    if B == 0 or B % group_size != 0:
        raise ValueError(
            f"group_advantages: batch of {B} rewards is not divisible by group_size={group_size}; "
            "the rollout must produce exactly group_size samples per prompt"
        )
    if unbiased and group_size < 2:
        raise ValueError("group_size must be >= 2 for the unbiased std (use unbiased=False for groups of 1)")
    if not torch.isfinite(r).all():
        bad = torch.nonzero(~torch.isfinite(r)).flatten().tolist()
        raise ValueError(f"group_advantages: non-finite rewards at indices {bad}")
    g = r.view(B // group_size, group_size)  # (P, G)
    mean = g.mean(dim=1, keepdim=True)  # (P, 1)
    std = g.std(dim=1, keepdim=True, correction=1 if unbiased else 0)  # (P, 1)
    adv = ((g - mean) / (std + eps)).clamp(-clip, clip)  # (P, G)
    return adv.reshape(B)  # (B,)


def completion_mask(
    token_ids: Tensor,
    eos_id: int | Sequence[int],
    prompt_lengths: int | Sequence[int] | Tensor | None = None,
) -> Tensor:
    """(B, L) float mask: 1 on completion tokens up to and including the first EOS, 0 elsewhere.

    ``token_ids`` is (B, L): either completions only, or prompt + completion with ``prompt_lengths`` (an int or one
    per row; left padding inside the prompt counts as prompt) giving where each completion starts. Tokens before the
    completion, after its first EOS (right padding included), are 0. A completion without EOS (it hit the length
    limit) is all 1. ``eos_id`` may be several ids (e.g. ``<|im_end|>`` and ``<|endoftext|>``).
    """
    if token_ids.ndim != 2:
        raise ValueError(f"completion_mask expects token_ids of shape (B, L), got {tuple(token_ids.shape)}")
    B, L = token_ids.shape
    device = token_ids.device
    pos = torch.arange(L, device=device).unsqueeze(0)  # (1, L)
    if prompt_lengths is None:
        start = torch.zeros(B, dtype=torch.long, device=device)  # (B,)
    else:
        start = torch.as_tensor(prompt_lengths, dtype=torch.long, device=device).expand(B)  # (B,)
        if (start < 0).any() or (start > L).any():
            raise ValueError(f"prompt_lengths must lie in [0, {L}], got {start.tolist()}")
    in_completion = pos >= start.unsqueeze(1)  # (B, L)
    eos = torch.as_tensor(eos_id, dtype=token_ids.dtype, device=device).reshape(-1)  # (n_eos,)
    is_eos = torch.isin(token_ids, eos) & in_completion  # (B, L)
    has_eos = is_eos.any(dim=1)  # (B,)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(start, L))  # (B,) first max index
    mask = in_completion & (pos <= first_eos.unsqueeze(1))  # (B, L)
    return mask.float()


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(π_θ ‖ π_ref): ``exp(ℓref - ℓ) - (ℓref - ℓ) - 1`` (>= 0, 0 iff equal)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def ppo_clip_objective(ratio: Tensor, advantages: Tensor, clip_eps: float) -> Tensor:
    """PPO surrogate to maximise, elementwise: ``min(ρ A, clip(ρ, 1-ε, 1+ε) A)`` (``advantages`` broadcasts)."""
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    return torch.minimum(ratio * advantages, ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages)


def ratio_stats(ratio: Tensor, advantages: Tensor, clip_eps: float, mask: Tensor | None = None) -> dict[str, Tensor]:
    """Detached monitors of the importance ratio over the (masked) elements.

    ``clip_fraction``: share of elements where the clip is active (the gradient is cut: ρ > 1+ε with A > 0 or
    ρ < 1-ε with A < 0). ``ratio_mean``, ``ratio_max_dev`` = max |ρ - 1| (0 on a first, on-policy update).
    ``approx_kl_old``: k3 estimate of KL(π_old ‖ π_θ) = mean((ρ - 1) - log ρ) (samples come from π_old).
    """
    ratio = ratio.detach()
    adv = torch.broadcast_to(advantages.detach(), ratio.shape)
    m = torch.ones_like(ratio, dtype=torch.bool) if mask is None else mask.detach().bool()
    n = m.sum().clamp(min=1)
    active = ((ratio > 1.0 + clip_eps) & (adv > 0)) | ((ratio < 1.0 - clip_eps) & (adv < 0))
    approx_kl = (ratio - 1.0) - torch.log(ratio)
    return {
        "clip_fraction": (active & m).sum() / n,
        "ratio_mean": torch.where(m, ratio, 0.0).sum() / n,
        "ratio_max_dev": torch.where(m, (ratio - 1.0).abs(), 0.0).max(),
        "approx_kl_old": torch.where(m, approx_kl, 0.0).sum() / n,
    }


def lm_grpo_loss(
    logp: Tensor,
    old_logp: Tensor,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Token-level GRPO loss (see the module docstring); returns ``(loss, stats)``.

    Shapes: ``logp``, ``old_logp``, ``ref_logp``, ``mask`` (B, L) (per-token log-probs of the sampled completion
    tokens, ``mask`` from ``completion_mask``); ``advantages`` (B,). ``old_logp`` and ``ref_logp`` are treated as
    constants (detached). ``ref_logp`` may be None only when ``beta == 0``. Masked positions are ignored even if
    they hold -inf. ``stats`` holds detached scalars: ``policy_loss``, ``kl`` (mean k3 KL to the reference, with the
    loss's normalisation), and the ``ratio_stats`` monitors over completion tokens.
    """
    if logp.ndim != 2:
        raise ValueError(f"lm_grpo_loss expects logp of shape (B, L), got {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"lm_grpo_loss: {name} has shape {tuple(t.shape)}, expected {tuple(logp.shape)}")
    if advantages.shape != (logp.shape[0],):
        raise ValueError(f"lm_grpo_loss: advantages must have shape ({logp.shape[0]},), got {tuple(advantages.shape)}")
    if beta != 0 and ref_logp is None:
        raise ValueError(f"lm_grpo_loss: beta={beta} needs ref_logp (log-probs of the frozen reference)")
    m = mask.bool()  # (B, L)
    # zero masked positions first so -inf / garbage there cannot leak NaN into the loss or its gradient
    logp_m = logp.masked_fill(~m, 0.0)
    old_m = old_logp.detach().masked_fill(~m, 0.0)
    ratio = torch.exp(logp_m - old_m)  # (B, L); exactly 1 where old == new
    adv = advantages.detach().to(logp.dtype).unsqueeze(1)  # (B, 1)
    objective = ppo_clip_objective(ratio, adv, clip_eps)  # (B, L)
    if ref_logp is not None:
        kl = k3_kl(logp_m, ref_logp.detach().masked_fill(~m, 0.0))  # (B, L)
    else:
        kl = torch.zeros_like(logp_m)
    lengths = m.sum(dim=1).clamp(min=1).to(logp.dtype)  # (B,) |y_i|

    def seq_mean(t: Tensor) -> Tensor:  # (B, L) -> (B,): token sum over the completion / |y_i|
        return torch.where(m, t, 0.0).sum(dim=1) / lengths

    per_seq = seq_mean(objective - beta * kl)  # (B,)
    loss = -per_seq.mean()
    stats = {
        "policy_loss": -seq_mean(objective).mean().detach(),
        "kl": seq_mean(kl).mean().detach(),
        **ratio_stats(ratio, adv, clip_eps, m),
    }
    return loss, stats
