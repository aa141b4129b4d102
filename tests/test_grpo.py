"""GRPO maths against independent numpy / pure-Python computations: advantages, masks, k3 KL, the LM loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from unirl.rl.grpo import completion_mask, group_advantages, k3_kl, lm_grpo_loss, ppo_clip_objective

EOS = 2


# --- advantages -------------------------------------------------------------------------------------------------


def _np_advantages(r: np.ndarray, G: int, ddof: int) -> np.ndarray:
    g = r.reshape(-1, G)
    adv = (g - g.mean(axis=1, keepdims=True)) / (g.std(axis=1, ddof=ddof, keepdims=True) + 1e-4)
    return np.clip(adv, -5, 5).reshape(-1)


@pytest.mark.parametrize("group_size", [2, 4, 8])
@pytest.mark.parametrize("unbiased", [True, False])
def test_group_advantages_match_numpy(group_size: int, unbiased: bool) -> None:
    r = np.random.default_rng(group_size).uniform(0, 1, size=3 * group_size)
    adv = group_advantages(torch.tensor(r), group_size, unbiased=unbiased)
    np.testing.assert_allclose(adv.numpy(), _np_advantages(r, group_size, ddof=1 if unbiased else 0), rtol=1e-12)


@pytest.mark.parametrize("group_size", [2, 3, 8])
def test_group_advantages_zero_mean_per_group(group_size: int) -> None:
    r = torch.rand(5 * group_size, generator=torch.Generator().manual_seed(0))
    adv = group_advantages(r, group_size).view(5, group_size)
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(5), atol=1e-6, rtol=0)
    assert (adv.std(dim=1) > 0.9).all()  # unit (unbiased) std up to the 1e-4 epsilon


def test_group_advantages_default_is_unbiased_std() -> None:
    adv = group_advantages(torch.tensor([0.0, 1.0]), 2)
    # mean 0.5, unbiased std = sqrt(0.5) -> ±0.5/0.7071 ≈ ±0.7070; the population std (0.5) would give ±1.0
    torch.testing.assert_close(adv, torch.tensor([-0.5, 0.5]) / (0.5**0.5 + 1e-4))


def test_group_advantages_constant_group_is_zero() -> None:
    adv = group_advantages(torch.tensor([0.3, 0.3, 0.3, 1.0, 0.0, 0.5]), 3)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]


def test_group_advantages_clip_at_5() -> None:
    r = np.zeros(30)
    r[0] = 1.0  # one success in a group of 30: z = (1 - 1/30) / std ≈ 5.29
    unclipped = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
    assert unclipped.max() > 5
    adv = group_advantages(torch.tensor(r), 30)
    assert adv.max().item() == 5.0
    np.testing.assert_allclose(adv.numpy(), np.clip(unclipped, -5, 5))


def test_group_advantages_errors() -> None:
    with pytest.raises(ValueError, match="not divisible by group_size=4"):
        group_advantages(torch.rand(6), 4)
    with pytest.raises(ValueError, match="unbiased"):
        group_advantages(torch.rand(4), 1)
    assert group_advantages(torch.rand(4), 1, unbiased=False).abs().max() == 0
    with pytest.raises(ValueError, match="non-finite rewards at indices \\[1\\]"):
        group_advantages(torch.tensor([0.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="shape \\(B,\\)"):
        group_advantages(torch.rand(2, 2), 2)


# --- completion mask --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([5, 6, EOS, 7, 7], [1, 1, 1, 0, 0]),  # EOS included, everything after excluded
        ([EOS, 5, 6], [1, 0, 0]),
        ([5, 6, 7], [1, 1, 1]),  # no EOS: the whole completion
        ([5, EOS, EOS, 0], [1, 1, 0, 0]),  # only the first EOS counts; padding after it is 0
    ],
)
def test_completion_mask_cases(tokens: list[int], expected: list[int]) -> None:
    mask = completion_mask(torch.tensor([tokens]), EOS)
    assert mask.dtype == torch.float32 and mask.shape == (1, len(tokens))
    assert mask[0].tolist() == expected


def test_completion_mask_with_prompt_lengths_ignores_eos_in_prompt() -> None:
    ids = torch.tensor([[0, 9, EOS, 5, EOS, 0], [9, 9, 9, 9, 5, 6]])  # (2, 6): prompt of 3 tokens, then completion
    mask = completion_mask(ids, EOS, prompt_lengths=[3, 4])
    assert mask.tolist() == [[0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1]]


def test_completion_mask_several_eos_ids() -> None:
    mask = completion_mask(torch.tensor([[5, 7, 5, EOS], [5, EOS, 7, 5]]), [EOS, 7])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_completion_mask_matches_python_loop() -> None:
    ids = torch.randint(0, 5, (16, 12), generator=torch.Generator().manual_seed(0))
    starts = torch.randint(0, 6, (16,), generator=torch.Generator().manual_seed(1))
    mask = completion_mask(ids, EOS, prompt_lengths=starts)
    for row, start, m in zip(ids.tolist(), starts.tolist(), mask.tolist()):
        expected, done = [], False
        for j, tok in enumerate(row):
            expected.append(1.0 if j >= start and not done else 0.0)
            done = done or (j >= start and tok == EOS)
        assert m == expected


def test_completion_mask_errors() -> None:
    with pytest.raises(ValueError, match="prompt_lengths must lie in"):
        completion_mask(torch.zeros(1, 3, dtype=torch.long), EOS, prompt_lengths=4)
    with pytest.raises(ValueError, match="\\(B, L\\)"):
        completion_mask(torch.zeros(3, dtype=torch.long), EOS)


# --- k3 KL and the PPO surrogate --------------------------------------------------------------------------------


def test_k3_kl_zero_when_equal_and_nonnegative() -> None:
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, generator=g) * 5
    assert k3_kl(logp, logp).abs().max() == 0
    ref = -torch.rand(64, generator=g) * 5
    kl = k3_kl(logp, ref)
    assert (kl >= 0).all()
    d = (ref - logp).double().numpy()
    np.testing.assert_allclose(kl.double().numpy(), np.exp(d) - d - 1, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("ratio", "adv", "expected"),
    [
        (1.5, 1.0, 1.2),  # clipped from above for a positive advantage
        (0.5, 1.0, 0.5),  # a lower ratio is not clipped when A > 0 (min picks ρA)
        (0.5, -1.0, -0.8),  # clipped from below for a negative advantage
        (1.5, -1.0, -1.5),
        (1.1, 2.0, 2.2),  # inside the clip range
    ],
)
def test_ppo_clip_objective(ratio: float, adv: float, expected: float) -> None:
    out = ppo_clip_objective(torch.tensor([ratio], dtype=torch.float64), torch.tensor([adv], dtype=torch.float64), 0.2)
    assert out.item() == pytest.approx(expected)


# --- LM loss ----------------------------------------------------------------------------------------------------


def _lm_case(seed: int = 0, B: int = 4, L: int = 6):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3  # (B, L)
    mask = torch.ones(B, L, dtype=torch.float64)
    lengths = [6, 3, 1, 4][:B]
    for i, n in enumerate(lengths):
        mask[i, n:] = 0
    adv = torch.tensor([1.0, -0.5, 2.0, -1.5][:B], dtype=torch.float64)
    return logp, mask, adv


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_lm_loss_first_update_ratio_one_and_loss_is_minus_mean_advantage(beta: float) -> None:
    logp, mask, adv = _lm_case()
    logp.requires_grad_(True)
    loss, stats = lm_grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2, beta=beta)
    assert stats["ratio_mean"].item() == 1.0 and stats["ratio_max_dev"].item() == 0.0
    assert stats["kl"].item() == 0.0 and stats["clip_fraction"].item() == 0.0
    assert stats["approx_kl_old"].item() == 0.0
    torch.testing.assert_close(loss, -adv.mean(), rtol=0, atol=1e-12)


def _np_lm_loss_and_grad(logp, old, ref, adv, mask, eps, beta):
    """Independent float64 numpy computation of the DESIGN.md LM loss and its gradient w.r.t. logp."""
    B = logp.shape[0]
    n = mask.sum(axis=1, keepdims=True)
    ratio = np.exp(logp - old)
    a = adv[:, None]
    unclipped, clipped = ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a
    obj = np.minimum(unclipped, clipped)
    d = ref - logp
    kl = np.exp(d) - d - 1
    loss = -(((obj - beta * kl) * mask).sum(axis=1) / n[:, 0]).mean()
    # d obj/d logp = ρ A where the unclipped term is the min (or both equal), 0 where the clip is active
    dobj = np.where(unclipped <= clipped, ratio * a, 0.0)
    dkl = 1 - np.exp(d)
    grad = -(dobj - beta * dkl) * mask / n / B
    return loss, grad


def test_lm_loss_value_and_gradient_match_hand_computation() -> None:
    logp, mask, adv = _lm_case(seed=1)
    g = torch.Generator().manual_seed(2)
    old = logp + 0.4 * torch.randn(logp.shape, generator=g, dtype=torch.float64)  # ratios in and out of the clip
    ref = logp + 0.3 * torch.randn(logp.shape, generator=g, dtype=torch.float64)
    eps, beta = 0.2, 0.1
    ratio = torch.exp(logp - old)
    active = ((ratio > 1 + eps) & (adv[:, None] > 0)) | ((ratio < 1 - eps) & (adv[:, None] < 0))
    assert (active & mask.bool()).any() and (~active & mask.bool()).any()  # the case exercises both branches
    x = logp.clone().requires_grad_(True)
    loss, stats = lm_grpo_loss(x, old, ref, adv, mask, clip_eps=eps, beta=beta)
    loss.backward()
    arrays = (t.numpy() for t in (logp, old, ref, adv, mask))
    np_loss, np_grad = _np_lm_loss_and_grad(*arrays, eps, beta)
    assert loss.item() == pytest.approx(np_loss, rel=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), np_grad, rtol=1e-10, atol=1e-14)
    m = mask.bool()
    assert stats["clip_fraction"].item() == pytest.approx((active & m).sum().item() / m.sum().item())
    assert stats["ratio_mean"].item() == pytest.approx(ratio[m].mean().item())


def test_lm_loss_tokens_after_eos_carry_no_loss_or_gradient() -> None:
    ids = torch.tensor([[5, 6, EOS, 7, 8], [5, EOS, 0, 0, 0]])  # (2, 5)
    mask = completion_mask(ids, EOS)
    logp = -torch.rand(2, 5, dtype=torch.float64)
    logp[mask == 0] = float("-inf")  # garbage beyond the first EOS must not matter
    x = logp.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = lm_grpo_loss(x, logp.detach(), logp.detach(), adv, mask, clip_eps=0.2, beta=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert (x.grad[mask == 0] == 0).all() and (x.grad[mask == 1] != 0).all()
    # on-policy gradient of token l of sequence i is -A_i / (|y_i| B): |y| = (3, 2), B = 2
    torch.testing.assert_close(x.grad[0, :3], torch.full((3,), -1.0 / 6, dtype=torch.float64))
    torch.testing.assert_close(x.grad[1, :2], torch.full((2,), 1.0 / 4, dtype=torch.float64))


def test_lm_loss_errors() -> None:
    logp, mask, adv = _lm_case()
    with pytest.raises(ValueError, match="needs ref_logp"):
        lm_grpo_loss(logp, logp, None, adv, mask, clip_eps=0.2, beta=0.1)
    with pytest.raises(ValueError, match="mask has shape"):
        lm_grpo_loss(logp, logp, None, adv, mask[:, :3], clip_eps=0.2, beta=0.0)
    with pytest.raises(ValueError, match="advantages must have shape"):
        lm_grpo_loss(logp, logp, None, adv[:2], mask, clip_eps=0.2, beta=0.0)
    loss, stats = lm_grpo_loss(logp, logp, None, adv, mask, clip_eps=0.2, beta=0.0)  # no reference needed at β=0
    assert stats["kl"].item() == 0.0 and torch.isfinite(loss)
