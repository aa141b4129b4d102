"""Flow-GRPO's ODE -> SDE sampling step with its Gaussian log-prob, the DM KL term and the DM GRPO loss.

Adapted from flow_grpo's ``sde_step_with_logprob`` (flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, also used by
UniRL-Zero's ``fm_step_prob.py``) (adapted: a pure function of explicit sigmas instead of a patched diffusers
scheduler method looking timesteps up; the σ=1 clamp value is an argument; the mean/std and the log-prob are separate
functions so the loss can replay stored transitions; the returned ``std`` is the full step std, not ``s``; inputs
are validated; the DM loss and KL live next to it).

The step (DESIGN.md section 1). With ``σ`` the current (shifted) sigma, ``σ'`` the next one, ``Δ = σ' - σ < 0``,
``a`` the noise level and ``v`` the (CFG-combined) velocity::

    s    = a * sqrt(σ / (1 - σ̃)),   σ̃ = σ if σ < 1 else sigma_max   (only the denominator is clamped)
    μ    = x (1 + s² Δ / (2σ)) + v (1 + s² (1 - σ) / (2σ)) Δ
    std  = s * sqrt(-Δ)
    x'   = μ + std * ε,              ε ~ N(0, I)
    logp = mean over latent dims of log N(x'; μ, std²)

The σ = 1 clamp: at the first step of a schedule starting at σ = 1, ``σ / (1 - σ)`` is infinite. Flow-GRPO (and
UniRL-Zero) replace σ by ``sigma_max = scheduler.sigmas[1]`` in the ``1 - σ`` denominator only, so
``s = a / sqrt(1 - sigmas[1])`` there. ``sigmas[1]`` is exactly the next sigma of that first step, so by default
(``sigma_max=None``) we clamp to ``sigma_next``, which reproduces Flow-GRPO's values; pass ``sigma_max`` to clamp to
another value. Steps with σ < 1 are unaffected. The mean formula keeps the true σ = 1 (its second bracket is then 1).

The log-prob is the mean (not the sum) over latent dims, as in Flow-GRPO: it rescales log-ratios by 1/(C·H·W), so
the clip range ε is on a per-dimension scale (hence Flow-GRPO's tiny ε, e.g. 1e-4 .. 1e-3).

The DM KL (``dm_kl``) is Flow-GRPO's form (the one DESIGN.md prescribes), ``mean((μ_θ - μ_ref)² / (2 s²))`` with
``s`` the noise *scale*, not the step std: the exact KL of the two step Gaussians is
``mean((μ_θ - μ_ref)² / (2 s² (-Δ)))``, so this is that KL times ``(-Δ)``. It is kept so that the paper's β_dm values
transfer.
(Note: UniRL-Zero's blip3o trainer divides by the *full* step std², i.e. the exact KL; DESIGN.md fixes the form above.)

The loss (``dm_grpo_loss``): PPO-clip on per-step ratios ``exp(logp_θ - logp_old)``, mean over steps and samples, plus
``β_dm * mean(KL)``. ``sde_window`` picks the steps that are SDE (trained) when the rest run as plain ODE Euler steps
(Flow-GRPO-Fast / MixGRPO style).
"""

from __future__ import annotations

import math
import random

import torch
from torch import Tensor

from unirl.rl.grpo import ppo_clip_objective, ratio_stats

__all__ = [
    "dm_grpo_loss",
    "dm_kl",
    "ode_step",
    "sde_log_prob",
    "sde_mean_std",
    "sde_noise_scale",
    "sde_step",
    "sde_window",
]

SigmaLike = float | Tensor


def _per_sample(value: SigmaLike, B: int, like: Tensor, name: str) -> Tensor:
    """A scalar or (B,) sigma as a (B,) tensor on ``like``'s device/dtype."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        return t.expand(B)  # (B,)
    if t.shape != (B,):
        raise ValueError(f"{name} must be a scalar or of shape ({B},), got {tuple(t.shape)}")
    return t


def _check_schedule(sigma: Tensor, sigma_next: Tensor) -> None:
    if not ((sigma > 0) & (sigma <= 1)).all():
        raise ValueError(f"sigma must lie in (0, 1], got {sigma.tolist()}")
    if not ((sigma_next >= 0) & (sigma_next < sigma)).all():
        raise ValueError(
            f"sigma_next must satisfy 0 <= sigma_next < sigma (Δ = sigma_next - sigma < 0: steps go from noise to "
            f"data), got sigma={sigma.tolist()} sigma_next={sigma_next.tolist()}"
        )


def _expand(t: Tensor, ndim: int) -> Tensor:
    return t.reshape(-1, *([1] * (ndim - 1)))  # (B,) -> (B, 1, ..., 1)


def sde_noise_scale(
    sigma: SigmaLike, sigma_next: SigmaLike, noise_level: float, sigma_max: float | None = None
) -> Tensor:
    """``s = a * sqrt(σ / (1 - σ̃))`` with σ̃ = σ, or ``sigma_max`` (default: ``sigma_next``) where σ = 1; shape of σ."""
    sig = torch.as_tensor(sigma)
    if not sig.is_floating_point():
        sig = sig.to(torch.get_default_dtype())
    sig_n = torch.as_tensor(sigma_next, dtype=sig.dtype, device=sig.device)
    sig, sig_n = torch.broadcast_tensors(sig, sig_n)
    _check_schedule(sig.reshape(-1), sig_n.reshape(-1))
    if noise_level <= 0:
        raise ValueError(f"noise_level must be > 0 for an SDE step (got {noise_level}); use ode_step for a = 0")
    if sigma_max is not None and not 0 < sigma_max < 1:
        raise ValueError(f"sigma_max must lie in (0, 1), got {sigma_max}")
    clamp = sig_n if sigma_max is None else torch.full_like(sig, float(sigma_max))
    denom_sigma = torch.where(sig >= 1, clamp, sig)
    return noise_level * torch.sqrt(sig / (1 - denom_sigma))


def sde_mean_std(
    x: Tensor,
    velocity: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: float,
    sigma_max: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Mean ``μ`` (B, C, H, W) and std ``s sqrt(-Δ)`` (B, 1, 1, 1) of the SDE transition (computed in >= float32)."""
    if x.shape != velocity.shape:
        raise ValueError(f"x {tuple(x.shape)} and velocity {tuple(velocity.shape)} must have the same shape")
    if x.ndim < 2:
        raise ValueError(f"x must be batched latents (B, C, H, W), got shape {tuple(x.shape)}")
    dtype = torch.promote_types(x.dtype, torch.float32)  # bf16 overflows in μ (Flow-GRPO upcasts too)
    x, velocity = x.to(dtype), velocity.to(dtype)
    B = x.shape[0]
    sig = _per_sample(sigma, B, x, "sigma")  # (B,)
    sig_n = _per_sample(sigma_next, B, x, "sigma_next")  # (B,)
    s = _expand(sde_noise_scale(sig, sig_n, noise_level, sigma_max), x.ndim)  # (B, 1, 1, 1)
    sig, sig_n = _expand(sig, x.ndim), _expand(sig_n, x.ndim)  # (B, 1, 1, 1)
    dt = sig_n - sig  # (B, 1, 1, 1), < 0
    mean = x * (1 + s**2 * dt / (2 * sig)) + velocity * (1 + s**2 * (1 - sig) / (2 * sig)) * dt  # (B, C, H, W)
    std = s * torch.sqrt(-dt)  # (B, 1, 1, 1)
    return mean, std


def sde_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """Gaussian log-density of ``x_next`` under N(mean, std²), mean over all non-batch dims -> (B,).

    ``x_next`` is data (a stored sample), so it is detached; gradients flow through ``mean`` only.
    """
    x_next = x_next.detach().to(mean.dtype)
    lp = -((x_next - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)  # (B, C, H, W)
    return lp.mean(dim=tuple(range(1, lp.ndim)))  # (B,)


def sde_step(
    x: Tensor,
    velocity: Tensor,
    sigma: SigmaLike,
    sigma_next: SigmaLike,
    noise_level: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    sigma_max: float | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One SDE step: returns ``(x_next (B,C,H,W), log_prob (B,), mean (B,C,H,W), std (B,1,1,1))``.

    ``sigma``/``sigma_next``: scalars or (B,) tensors. With ``noise`` given, ``x_next = mean + std * noise``;
    otherwise ε is drawn with ``generator`` (on the generator's device, so a CPU generator reproduces the same noise
    on any device). Outputs are in ``x``'s dtype promoted to at least float32.
    """
    mean, std = sde_mean_std(x, velocity, sigma, sigma_next, noise_level, sigma_max)
    if noise is None:
        gen_device = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=gen_device, dtype=mean.dtype).to(mean.device)
    elif noise.shape != mean.shape:
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {tuple(mean.shape)}")
    x_next = mean + std * noise.to(mean.dtype)  # (B, C, H, W)
    return x_next, sde_log_prob(x_next, mean, std), mean, std


def ode_step(x: Tensor, velocity: Tensor, sigma: SigmaLike, sigma_next: SigmaLike) -> Tensor:
    """Plain Euler flow step ``x + v (σ' - σ)`` (the deterministic steps outside the SDE window)."""
    if x.shape != velocity.shape:
        raise ValueError(f"x {tuple(x.shape)} and velocity {tuple(velocity.shape)} must have the same shape")
    B = x.shape[0]
    sig = _per_sample(sigma, B, x, "sigma")  # (B,)
    sig_n = _per_sample(sigma_next, B, x, "sigma_next")  # (B,)
    _check_schedule(sig, sig_n)
    return x + velocity * _expand(sig_n - sig, x.ndim)  # (B, C, H, W)


def dm_kl(mean: Tensor, ref_mean: Tensor, noise_scale: SigmaLike | Tensor) -> Tensor:
    """Flow-GRPO's DM KL term ``mean((μ_θ - μ_ref)² / (2 s²))`` over latent dims -> (B,).

    ``noise_scale`` is ``s_k = a sqrt(σ_k / (1 - σ_k))`` (``sde_noise_scale``; a scalar, (B,) or (B, 1, 1, 1)),
    NOT the step std ``s_k sqrt(-Δ_k)`` that ``sde_step`` returns. Since the step std² is ``s_k² (-Δ_k)``, this is the
    exact KL between the policy's and the reference's Gaussian step, multiplied by ``(-Δ_k)``; it is kept in this form
    (as the reference code and Flow-GRPO compute it) so that the paper's β_dm values transfer.
    """
    if mean.shape != ref_mean.shape:
        raise ValueError(f"mean {tuple(mean.shape)} and ref_mean {tuple(ref_mean.shape)} must have the same shape")
    s = torch.as_tensor(noise_scale, dtype=mean.dtype, device=mean.device)
    if s.ndim == 1:
        s = _expand(s, mean.ndim)  # (B,) -> (B, 1, 1, 1)
    kl = (mean - ref_mean.detach()) ** 2 / (2 * s**2)  # (B, C, H, W)
    return kl.mean(dim=tuple(range(1, kl.ndim)))  # (B,)


def dm_grpo_loss(
    log_prob: Tensor,
    old_log_prob: Tensor,
    advantages: Tensor,
    clip_eps: float,
    beta: float,
    kl: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DM GRPO loss ``-mean_{i,k} min(ρ_ik A_i, clip(ρ_ik) A_i) + β mean_{i,k} KL_ik``; returns ``(loss, stats)``.

    Shapes: ``log_prob``, ``old_log_prob`` (B, T) per-step log-probs (T = trained SDE steps), ``advantages`` (B,)
    (the same ``A_i`` for every step) or (B, T), ``kl`` (B, T) from ``dm_kl`` (required when ``beta != 0``).
    ``stats`` holds detached scalars: ``policy_loss``, ``kl``, and the ``ratio_stats`` monitors.
    """
    if log_prob.ndim != 2 or old_log_prob.shape != log_prob.shape:
        raise ValueError(
            f"dm_grpo_loss expects log_prob and old_log_prob of shape (B, T), got {tuple(log_prob.shape)} and "
            f"{tuple(old_log_prob.shape)}"
        )
    B, T = log_prob.shape
    if advantages.shape == (B,):
        adv = advantages.unsqueeze(1)  # (B, 1)
    elif advantages.shape == (B, T):
        adv = advantages
    else:
        raise ValueError(
            f"dm_grpo_loss: advantages must have shape ({B},) or ({B}, {T}), got {tuple(advantages.shape)}"
        )
    adv = adv.detach().to(log_prob.dtype)
    if kl is not None and kl.shape != (B, T):
        raise ValueError(f"dm_grpo_loss: kl must have shape ({B}, {T}), got {tuple(kl.shape)}")
    if beta != 0 and kl is None:
        raise ValueError(f"dm_grpo_loss: beta={beta} needs kl (dm_kl against the frozen reference), got None")
    ratio = torch.exp(log_prob - old_log_prob.detach())  # (B, T)
    policy_loss = -ppo_clip_objective(ratio, adv, clip_eps).mean()
    kl_mean = kl.mean() if kl is not None else torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)
    loss = policy_loss + beta * kl_mean
    stats = {"policy_loss": policy_loss.detach(), "kl": kl_mean.detach(), **ratio_stats(ratio, adv, clip_eps)}
    return loss, stats


def sde_window(
    num_steps: int,
    window_size: int,
    rng: int | random.Random | None = None,
    mode: str = "random",
    window_range: tuple[int, int] | None = None,
) -> list[int]:
    """Indices of the SDE steps: a contiguous window of ``window_size`` steps; the others run as ODE steps.

    ``mode="fixed"``: the window starts at ``window_range[0]`` (default 0, the noisiest steps). ``mode="random"``:
    its start is drawn uniformly from ``[lo, hi - window_size]`` (Flow-GRPO-Fast's ``sde_window_range``) with
    ``rng`` (a seed or ``random.Random``; required, so that a run and its resume draw the same windows).
    ``window_size == num_steps`` gives all steps.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 1 <= window_size <= num_steps:
        raise ValueError(f"window_size must lie in [1, num_steps={num_steps}], got {window_size}")
    lo, hi = window_range if window_range is not None else (0, num_steps)
    if not 0 <= lo < hi <= num_steps or hi - lo < window_size:
        raise ValueError(
            f"window_range {window_range} must satisfy 0 <= lo < hi <= num_steps={num_steps} with room for "
            f"window_size={window_size}"
        )
    if mode == "fixed":
        start = lo
    elif mode == "random":
        if rng is None:
            raise ValueError("sde_window(mode='random') needs rng: a seed derived from the training step")
        gen = rng if isinstance(rng, random.Random) else random.Random(rng)
        start = gen.randint(lo, hi - window_size)
    else:
        raise ValueError(f"mode must be 'random' or 'fixed', got {mode!r}")
    return list(range(start, start + window_size))
