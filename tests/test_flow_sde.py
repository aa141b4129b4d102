"""Flow-GRPO SDE step, KL and DM loss against independent numpy / torch.distributions computations."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from torch.distributions import Normal, kl_divergence

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

A = 0.7  # noise level


def _latents(seed: int = 0, B: int = 3, shape: tuple[int, ...] = (4, 5, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, *shape, generator=g, dtype=torch.float64)  # (B, C, H, W)
    v = torch.randn(B, *shape, generator=g, dtype=torch.float64)  # (B, C, H, W)
    eps = torch.randn(B, *shape, generator=g, dtype=torch.float64)  # (B, C, H, W)
    return x, v, eps


def _np_sde(x, v, sig, sig_n, a, sigma_max=None):
    """Direct numpy evaluation of DESIGN.md's step, one sample at a time (σ = 1 -> 1 - σ uses sigma_max or σ')."""
    means, stds = [], []
    for i in range(x.shape[0]):
        s_i, n_i = float(sig[i]), float(sig_n[i])
        denom = 1 - ((sigma_max if sigma_max is not None else n_i) if s_i == 1 else s_i)
        s = a * math.sqrt(s_i / denom)
        dt = n_i - s_i
        means.append(x[i] * (1 + s**2 * dt / (2 * s_i)) + v[i] * (1 + s**2 * (1 - s_i) / (2 * s_i)) * dt)
        stds.append(s * math.sqrt(-dt))
    return np.stack(means), np.array(stds)


@pytest.mark.parametrize(
    ("sigma", "sigma_next"),
    [(0.8, 0.6), (0.3, 0.0), (torch.tensor([0.9, 0.5, 0.2]), torch.tensor([0.7, 0.4, 0.05]))],
)
def test_sde_mean_and_std_match_numpy(sigma, sigma_next) -> None:
    x, v, eps = _latents()
    x_next, log_prob, mean, std = sde_step(x, v, sigma, sigma_next, A, noise=eps)
    sig = np.broadcast_to(np.asarray(sigma, dtype=np.float64), (3,))
    sig_n = np.broadcast_to(np.asarray(sigma_next, dtype=np.float64), (3,))
    np_mean, np_std = _np_sde(x.numpy(), v.numpy(), sig, sig_n, A)
    assert mean.shape == x.shape and std.shape == (3, 1, 1, 1) and log_prob.shape == (3,)
    np.testing.assert_allclose(mean.numpy(), np_mean, rtol=1e-12)
    np.testing.assert_allclose(std.flatten().numpy(), np_std, rtol=1e-12)
    torch.testing.assert_close(x_next, mean + std * eps, rtol=0, atol=0)  # x_next = mean + std * noise exactly


def test_sde_log_prob_matches_normal_and_numpy() -> None:
    x, v, eps = _latents(1)
    x_next, log_prob, mean, std = sde_step(x, v, 0.7, 0.55, A, noise=eps)
    expected = Normal(mean, std).log_prob(x_next).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, expected, rtol=1e-12, atol=1e-12)
    xn, mu, sd = x_next.numpy(), mean.numpy(), std.numpy()
    np_lp = (-((xn - mu) ** 2) / (2 * sd**2) - np.log(sd) - 0.5 * np.log(2 * np.pi)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(log_prob.numpy(), np_lp, rtol=1e-12)
    # with x_next = μ + std ε the density is -mean(ε²)/2 - log std - log √(2π)
    np_eps = eps.numpy()
    by_noise = -0.5 * (np_eps**2).mean(axis=(1, 2, 3)) - np.log(sd.flatten()) - 0.5 * np.log(2 * np.pi)
    np.testing.assert_allclose(log_prob.numpy(), by_noise, rtol=1e-10)


def test_sde_log_prob_gradient_flows_to_mean_only() -> None:
    x, v, eps = _latents(2)
    v = v.clone().requires_grad_(True)
    x_next, _, _, _ = sde_step(x, v.detach(), 0.6, 0.4, A, noise=eps)
    mean, std = sde_mean_std(x, v, 0.6, 0.4, A)
    sde_log_prob(x_next, mean, std).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0


def test_sigma_one_is_clamped_to_next_value_and_finite() -> None:
    x, v, eps = _latents(3)
    x_next, log_prob, mean, std = sde_step(x, v, 1.0, 0.95, A, noise=eps)
    assert all(torch.isfinite(t).all() for t in (x_next, log_prob, mean, std))
    np_mean, np_std = _np_sde(x.numpy(), v.numpy(), np.ones(3), np.full(3, 0.95), A)
    np.testing.assert_allclose(mean.numpy(), np_mean, rtol=1e-12)
    # s = a * sqrt(1 / (1 - 0.95)): only the 1 - σ denominator is clamped (Flow-GRPO's sigma_max = sigmas[1])
    assert sde_noise_scale(1.0, 0.95, A).item() == pytest.approx(A * math.sqrt(1 / 0.05))
    assert std.flatten()[0].item() == pytest.approx(A * math.sqrt(1 / 0.05) * math.sqrt(0.05))
    # an explicit sigma_max overrides the default; steps with σ < 1 ignore it
    assert sde_noise_scale(1.0, 0.95, A, sigma_max=0.9).item() == pytest.approx(A * math.sqrt(1 / 0.1))
    assert sde_noise_scale(0.5, 0.4, A, sigma_max=0.9).item() == pytest.approx(A)
    mixed = sde_noise_scale(torch.tensor([1.0, 0.5]), torch.tensor([0.9, 0.4]), A)
    torch.testing.assert_close(mixed, torch.tensor([A * math.sqrt(10.0), A]))


@pytest.mark.parametrize(
    ("sigma", "sigma_next", "noise_level", "match"),
    [
        (0.5, 0.5, A, "sigma_next < sigma"),  # Δ = 0
        (0.5, 0.6, A, "Δ = sigma_next - sigma < 0"),  # Δ > 0
        (torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0.4, 0.6, 0.1]), A, "sigma_next < sigma"),
        (1.2, 0.5, A, "sigma must lie in \\(0, 1\\]"),
        (0.0, 0.0, A, "sigma must lie in \\(0, 1\\]"),
        (0.5, 0.4, 0.0, "noise_level must be > 0"),
    ],
)
def test_sde_step_rejects_bad_schedules(sigma, sigma_next, noise_level, match) -> None:
    x, v, _ = _latents()
    with pytest.raises(ValueError, match=match):
        sde_step(x, v, sigma, sigma_next, noise_level)


def test_sde_step_shape_errors() -> None:
    x, v, eps = _latents()
    with pytest.raises(ValueError, match="same shape"):
        sde_step(x, v[:, :2], 0.5, 0.4, A)
    with pytest.raises(ValueError, match="noise has shape"):
        sde_step(x, v, 0.5, 0.4, A, noise=eps[:2])
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        sde_step(x, v, torch.tensor([0.5, 0.4]), 0.3, A)
    with pytest.raises(ValueError, match="sigma_max must lie in"):
        sde_step(x, v, 1.0, 0.4, A, sigma_max=1.0)


def test_sde_step_generator_reproducible_and_dtype() -> None:
    x, v, _ = _latents()
    a = sde_step(x, v, 0.5, 0.4, A, generator=torch.Generator().manual_seed(7))[0]
    b = sde_step(x, v, 0.5, 0.4, A, generator=torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b) and a.dtype == torch.float64
    out = sde_step(x.bfloat16(), v.bfloat16(), 0.5, 0.4, A, generator=torch.Generator().manual_seed(7))
    assert all(t.dtype == torch.float32 for t in out)  # bf16 latents are upcast (μ overflows in bf16)


def test_ode_step_is_euler() -> None:
    x, v, _ = _latents()
    torch.testing.assert_close(ode_step(x, v, 0.8, 0.5), x + v * (0.5 - 0.8), rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="sigma_next < sigma"):
        ode_step(x, v, 0.5, 0.8)


# --- KL and the DM loss ----------------------------------------------------------------------------------------


def test_dm_kl_zero_when_equal_and_equals_gaussian_kl_times_minus_delta() -> None:
    x, v, _ = _latents(4)
    sigma, sigma_next = torch.tensor([0.9, 0.6, 0.3]), torch.tensor([0.8, 0.3, 0.1])
    mean, std = sde_mean_std(x, v, sigma, sigma_next, A)
    ref_mean, _ = sde_mean_std(x, v + 0.1 * torch.randn_like(v), sigma, sigma_next, A)
    s = sde_noise_scale(sigma, sigma_next, A)
    assert dm_kl(mean, mean, s).abs().max() == 0
    kl = dm_kl(mean, ref_mean, s)
    assert kl.shape == (3,) and (kl > 0).all()
    exact = kl_divergence(Normal(mean, std), Normal(ref_mean, std)).mean(dim=(1, 2, 3))  # (B,) true step KL
    torch.testing.assert_close(kl, exact * (sigma - sigma_next).double(), rtol=1e-6, atol=0)
    np_kl = ((mean - ref_mean).numpy() ** 2 / (2 * s.double().numpy()[:, None, None, None] ** 2)).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(kl.numpy(), np_kl, rtol=1e-6)


def test_dm_loss_first_update_replay_gives_ratio_one() -> None:
    """Rollout stores (x_k, x_{k+1}, σ_k, log p); replaying the same velocities gives ρ ≡ 1 and loss = -mean(A)."""
    B, T = 4, 3
    sigmas = [1.0, 0.8, 0.5, 0.0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, 4, 4, generator=g)  # (B, C, H, W)
    velocities, xs, old_lp = [], [], []
    for k in range(T):
        vk = torch.randn(x.shape, generator=g)
        xs.append(x)
        x, lp, _, _ = sde_step(x, vk, sigmas[k], sigmas[k + 1], A, generator=g)
        velocities.append(vk)
        old_lp.append(lp)
    old_log_prob = torch.stack(old_lp, dim=1)  # (B, T)
    v_all = torch.cat(velocities).requires_grad_(True)  # (T*B, C, H, W): one batched "replay"
    x_all, x_next_all = torch.cat(xs), torch.cat(xs[1:] + [x])
    sig = torch.tensor(sigmas[:T]).repeat_interleave(B)  # (T*B,)
    sig_n = torch.tensor(sigmas[1:]).repeat_interleave(B)
    mean, std = sde_mean_std(x_all, v_all, sig, sig_n, A)
    log_prob = sde_log_prob(x_next_all, mean, std).view(T, B).T  # (B, T)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    kl = dm_kl(mean, mean.detach(), sde_noise_scale(sig, sig_n, A)).view(T, B).T  # (B, T), policy = reference
    loss, stats = dm_grpo_loss(log_prob, old_log_prob, adv, clip_eps=1e-3, beta=0.04, kl=kl)
    assert stats["ratio_max_dev"].item() <= 1e-5 and stats["clip_fraction"].item() == 0.0
    assert stats["kl"].item() == 0.0
    torch.testing.assert_close(loss, -adv.mean(), atol=1e-5, rtol=0)
    loss.backward()
    assert v_all.grad is not None and torch.isfinite(v_all.grad).all() and v_all.grad.abs().sum() > 0


def test_dm_loss_value_and_gradient_by_hand() -> None:
    g = torch.Generator().manual_seed(1)
    old = torch.randn(3, 4, generator=g, dtype=torch.float64)  # (B, T)
    lp = (old + torch.tensor([[0.0, 0.1, -0.1, 0.3]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    kl = torch.rand(3, 4, generator=g, dtype=torch.float64)
    eps, beta = 0.2, 0.5
    loss, stats = dm_grpo_loss(lp, old, adv, clip_eps=eps, beta=beta, kl=kl)
    loss.backward()
    ratio = np.exp(np.array([0.0, 0.1, -0.1, 0.3]))[None, :].repeat(3, 0)
    a = adv.numpy()[:, None]
    obj = np.minimum(ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a)
    assert loss.item() == pytest.approx(-obj.mean() + beta * kl.numpy().mean(), rel=1e-12)
    active = ((ratio > 1 + eps) & (a > 0)) | ((ratio < 1 - eps) & (a < 0))  # only step 3 (ρ = e^0.3), A > 0
    np.testing.assert_allclose(lp.grad.numpy(), np.where(active, 0.0, -ratio * a / 12), rtol=1e-12)
    assert stats["clip_fraction"].item() == pytest.approx(active.mean())


def test_dm_loss_errors() -> None:
    lp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="needs kl"):
        dm_grpo_loss(lp, lp, torch.zeros(2), clip_eps=0.1, beta=0.1)
    with pytest.raises(ValueError, match="advantages must have shape"):
        dm_grpo_loss(lp, lp, torch.zeros(3), clip_eps=0.1, beta=0.0)
    with pytest.raises(ValueError, match="\\(B, T\\)"):
        dm_grpo_loss(lp, lp[:, :2], torch.zeros(2), clip_eps=0.1, beta=0.0)
    loss, _ = dm_grpo_loss(lp, lp, torch.ones(2, 3), clip_eps=0.1, beta=0.0)  # per-step advantages accepted
    assert loss.item() == -1.0


# --- SDE window --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("num_steps", "window_size"), [(10, 1), (10, 3), (6, 6), (4, 2)])
def test_sde_window_random_is_a_contiguous_in_range_window(num_steps: int, window_size: int) -> None:
    starts = set()
    for seed in range(50):
        w = sde_window(num_steps, window_size, rng=seed)
        assert len(w) == window_size and w == list(range(w[0], w[0] + window_size))
        assert 0 <= w[0] and w[-1] < num_steps
        assert w == sde_window(num_steps, window_size, rng=random.Random(seed))  # seeded -> reproducible
        starts.add(w[0])
    assert starts == set(range(num_steps - window_size + 1))  # every admissible start is reachable


def test_sde_window_fixed_and_range() -> None:
    assert sde_window(10, 3, mode="fixed") == [0, 1, 2]
    assert sde_window(10, 2, mode="fixed", window_range=(4, 8)) == [4, 5]
    for seed in range(30):
        w = sde_window(10, 2, rng=seed, window_range=(0, 5))
        assert 0 <= w[0] and w[-1] <= 4
    assert sde_window(5, 5, rng=0) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_steps": 5, "window_size": 0, "rng": 0}, "window_size must lie"),
        ({"num_steps": 5, "window_size": 6, "rng": 0}, "window_size must lie"),
        ({"num_steps": 5, "window_size": 2}, "needs rng"),
        ({"num_steps": 5, "window_size": 2, "rng": 0, "mode": "sliding"}, "mode must be"),
        ({"num_steps": 5, "window_size": 3, "rng": 0, "window_range": (0, 2)}, "window_range"),
    ],
)
def test_sde_window_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sde_window(**kwargs)


# --- against diffusers' own flow-matching scheduler ---------------------------------------------------------------


def test_steps_on_the_diffusers_shifted_schedule() -> None:
    """ODE steps equal ``FlowMatchEulerDiscreteScheduler.step``; SDE steps over the whole schedule stay finite and
    the σ = 1 first step uses Flow-GRPO's ``sigma_max = sigmas[1]`` by default."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    sigmas = scheduler.sigmas.double()  # (11,), sigmas[0] = 1, sigmas[-1] = 0
    g = torch.Generator().manual_seed(0)
    x_ode = x_sde = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)  # (B, C, H, W)
    for k, t in enumerate(scheduler.timesteps):
        v = torch.randn(x_ode.shape, generator=g, dtype=torch.float64)
        expected = scheduler.step(v, t, x_ode).prev_sample
        x_ode = ode_step(x_ode, v, sigmas[k], sigmas[k + 1])
        torch.testing.assert_close(x_ode, expected.double(), rtol=1e-6, atol=1e-6)
        x_sde, log_prob, _, std = sde_step(x_sde, v, sigmas[k], sigmas[k + 1], A, generator=g)
        assert torch.isfinite(x_sde).all() and torch.isfinite(log_prob).all() and (std > 0).all()
    s0 = sde_noise_scale(sigmas[0], sigmas[1], A)
    assert s0.item() == pytest.approx(A * math.sqrt(1.0 / (1.0 - sigmas[1].item())))
    assert s0.item() == pytest.approx(sde_noise_scale(1.0, 0.5, A, sigma_max=sigmas[1].item()).item())
