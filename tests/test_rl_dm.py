"""DM GRPO through the real scenario code: ratio 1 on the first update, KL 0 at the reference, gradient routing,
batched replay = per-step loop, stored log-probs = an independent Gaussian density, seeds, window steps."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _rl_worker import check_rollout_log_probs_against_gaussian, grad_components, rl_config, small_model, write_data

from unirl.rl.dm_policy import DMSampling, dm_rollout, replay, replay_step, sample_ode, seeded_noise
from unirl.rl.prompts import load_prompts
from unirl.rl.scenario import get_scenario

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_dm")
    shards = write_data(root, n_train=4, n_test=2)
    model = small_model(root / "tok")
    # the reference path is zero-initialised; give it weights so the editing rollout really depends on it
    torch.manual_seed(1)
    torch.nn.init.normal_(model.ref_proj.weight, std=0.02)
    return root, model, {t: load_prompts(shards, t, "train") for t in ("t2i", "edit")}


def _scenario(root: Path, name: str, **kw):
    cfg = rl_config(root, name, "unused", cfg_scale=3.0, ref_cfg_scale=1.5, sde_steps=4, sde_window_size=2,
                    sde_window_mode="random", **kw)
    return get_scenario(name, cfg)


@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_first_update_ratio_is_one_and_gradients_reach_exactly_the_scenario_params(env, name):
    root, base, prompts = env
    model = copy.deepcopy(base)
    scenario = _scenario(root, name, beta_dm=0.0)
    groups = scenario.param_groups(model)
    assert [g["name"] for g in groups] == ["dm"]
    rollout = scenario.rollout(model, model, prompts[name][:2], 2, torch.Generator().manual_seed(3))
    dm = rollout.dm
    assert dm.x.shape[:2] == (4, 2) and dm.log_prob.shape == (4, 2) and len(dm.window) == 2
    assert dm.window == sorted(dm.window) and dm.window[1] == dm.window[0] + 1
    if name == "edit":  # the reverse edit is stored with the same window and its own reference latents
        rev = rollout.extras["reverse"]
        assert rev.window == dm.window and rev.ref_latents.shape == dm.ref_latents.shape and rev.repeat == 1
        assert dm.ref_latents is not None and len(rollout.extras["reconstructions"]) == 4
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, stats = scenario.loss(model, model, rollout, adv, 0)
    assert stats["ratio_max_dev"] < 1e-5, stats
    assert stats["logprob_gap"] < 1e-5 and stats["clip_fraction"] == 0.0
    # ratio = 1 and the advantages are zero-mean here, so the policy loss is 0 and only its gradient remains
    assert abs(stats["policy_loss"]) < 1e-5
    loss.backward()
    expected = {"t2i": {"dit", "connector", "t2i_queries"}, "edit": {"dit", "connector", "i2i_queries", "ref"}}[name]
    g = grad_components(model)
    assert g["any"] == expected, g
    assert g["nonzero"] == expected, g  # the queries' gradient crosses the frozen LM
    assert all(p.grad is None for _, p in model.parameter_groups()["lm"])


@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_kl_is_zero_at_the_reference_and_positive_after_a_change(env, name):
    root, base, prompts = env
    model = copy.deepcopy(base)
    ref = copy.deepcopy(base).requires_grad_(False)
    scenario = _scenario(root, name, beta_dm=0.5)
    scenario.param_groups(model)
    rollout = scenario.rollout(model, ref, prompts[name][:1], 2, torch.Generator().manual_seed(4))
    adv = torch.tensor([0.7, -0.7])
    _, stats = scenario.loss(model, ref, rollout, adv, 0)
    assert stats["kl"] == 0.0
    with torch.no_grad():
        model.connector.proj.weight.add_(0.05 * torch.randn_like(model.connector.proj.weight))
    _, stats = scenario.loss(model, ref, rollout, adv, 1)
    assert stats["kl"] > 0 and "logprob_gap" not in stats
    assert stats["ratio_max_dev"] > 0  # a later update: the policy moved away from the rollout's


def test_batched_replay_equals_the_per_step_loop(env):
    root, base, prompts = env
    model = copy.deepcopy(base)
    scenario = _scenario(root, "edit")
    scenario.param_groups(model)
    rollout = scenario.rollout(model, model, prompts["edit"][:2], 2, torch.Generator().manual_seed(5))
    rollouts = [rollout.dm, rollout.extras["reverse"]]
    ref = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():
        model.dit.proj_out.weight.mul_(1.01)  # so that the KL is not trivially zero
    batched = replay(model, rollouts, ref)
    looped = [replay_step(model, rollouts, w, ref) for w in range(2)]
    lp_loop = torch.cat([r.log_prob for r in looped], 1)  # (2B, W)
    kl_loop = torch.cat([r.kl for r in looped], 1)
    assert batched.log_prob.shape == (8, 2)
    torch.testing.assert_close(batched.log_prob, lp_loop, rtol=0, atol=1e-5)
    torch.testing.assert_close(batched.kl, kl_loop, rtol=1e-4, atol=1e-7)
    # the same gradient either way
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(batched.log_prob.sum(), params, allow_unused=True)
    g2 = torch.autograd.grad(lp_loop.sum(), params, allow_unused=True)
    for a, b in zip(g1, g2):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)


def test_chunked_replay_matches_the_one_pass_replay_and_its_gradient(env):
    """``replay_chunk``: checkpointed chunks of 3 transitions (not a divisor of 2B * W = 8) give the one-pass
    log-probs, KL and gradient, with the DiT's own block checkpointing on as at full scale."""
    root, base, prompts = env
    model = copy.deepcopy(base)
    scenario = _scenario(root, "edit", replay_chunk=3, beta_dm=0.5)
    scenario.param_groups(model)
    rollout = scenario.rollout(model, model, prompts["edit"][:2], 2, torch.Generator().manual_seed(6))
    rollouts = [rollout.dm, rollout.extras["reverse"]]
    ref = copy.deepcopy(base).requires_grad_(False)
    with torch.no_grad():
        model.dit.proj_out.weight.mul_(1.01)
    model.dit.enable_gradient_checkpointing()
    params = [p for p in model.parameters() if p.requires_grad]
    results, grads = [], []
    for chunk in (0, 3):
        res = replay(model, rollouts, ref, chunk=chunk)
        results.append(res)
        grads.append(torch.autograd.grad((res.log_prob + res.kl).sum(), params, allow_unused=True))
    torch.testing.assert_close(results[1].log_prob, results[0].log_prob, rtol=0, atol=1e-5)
    torch.testing.assert_close(results[1].kl, results[0].kl, rtol=1e-4, atol=1e-7)
    assert sum(g is not None for g in grads[0]) > 0
    for a, b in zip(grads[0], grads[1]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    with pytest.raises(ValueError, match="replay_chunk"):
        replay(model, rollouts, ref, chunk=-1)
    # the scenario's loss goes through the same path: first-update ratio 1 with chunks
    model2 = copy.deepcopy(base)
    scenario.param_groups(model2)
    _, stats = scenario.loss(model2, ref, rollout, torch.tensor([1.0, -1.0, 0.5, -0.5]), 0)
    assert stats["ratio_max_dev"] < 1e-5 and stats["logprob_gap"] < 1e-5


def test_stored_log_probs_match_an_independent_gaussian_density(env):
    root, model, prompts = env
    dm = check_rollout_log_probs_against_gaussian(model, [p["prompt"] for p in prompts["t2i"][:2]], 2)
    assert dm.window == [0, 1, 2, 3] and torch.isfinite(dm.log_prob).all()


def test_rollout_and_eval_sampling_are_seeded(env):
    root, model, prompts = env
    sampling = DMSampling(steps=3, window_size=1, window_mode="random")
    texts = [prompts["t2i"][0]["prompt"]]
    a = dm_rollout(model, texts, None, "t2i", 2, sampling, torch.Generator().manual_seed(9))
    b = dm_rollout(model, texts, None, "t2i", 2, sampling, torch.Generator().manual_seed(9))
    assert a.window == b.window and torch.equal(a.final, b.final) and torch.equal(a.log_prob, b.log_prob)
    assert not torch.equal(a.final[0], a.final[1])  # the G samples of a prompt differ
    # evaluation: one seed per sample, independent of the batch it is in
    both = sample_ode(model, [texts[0], prompts["t2i"][1]["prompt"]], None, "t2i", [5, 6], sampling)
    alone = sample_ode(model, texts, None, "t2i", [5], sampling)
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_ode_sampling_matches_diffusers_sana_pipeline(env, cfg_scale, load_bench):
    """Evaluation sampling = diffusers' ``SanaPipeline`` on the same DiT (``bench/dm_rl.py``'s comparison): same
    shifted sigmas, CFG against the zeroed connector output, same noise; the pipeline's DiT calls carry the T2I
    zero-reference tokens, as ours do."""
    bench = load_bench("dm_rl")
    root, base, prompts = env
    model = copy.deepcopy(base).eval()
    texts, steps = [p["prompt"] for p in prompts["t2i"][:2]], 3
    sampling = DMSampling(steps=steps, cfg_scale=cfg_scale, window_size=steps)
    with torch.no_grad(), bench.pipeline_guidance(model):
        ours = sample_ode(model, texts, None, "t2i", [3, 4], sampling)  # (2, C, H, W)
        cond = model.encode(texts, None, "t2i")  # (2, N, D)
        assert model.ref_proj(model.ref_patch_embed(torch.zeros((1, *model.latent_shape)))).abs().max() > 0
        theirs = bench.diffusers_sample(bench.sana_pipeline(model), model, cond, steps, cfg_scale,
                                        seeded_noise(model.latent_shape, [3, 4]))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_steps_before_the_window_are_plain_ode_steps(env):
    """A window at steps [2, 3): x entering step 2 is the Euler ODE from the rollout's initial noise."""
    root, model, prompts = env
    sampling = DMSampling(steps=4, cfg_scale=2.0, window_size=1, window_mode="fixed", window_range=(2, 4))
    texts = [prompts["t2i"][0]["prompt"]]
    a = dm_rollout(model, texts, None, "t2i", 1, sampling, torch.Generator().manual_seed(11))
    assert a.window == [2] and a.x.shape[1] == 1
    gen = torch.Generator().manual_seed(11)
    torch.randint(0, 2**31 - 1, (1,), generator=gen)  # the rollout draws its window seed first
    x = torch.randn((1, *model.latent_shape), generator=gen)  # (1, C, H, W)
    sigmas = model.scheduler.sigmas(4)
    with torch.no_grad():
        cond = model.encode(texts, None, "t2i")
        for k in range(2):
            x = x + (sigmas[k + 1] - sigmas[k]) * model.guided_velocity(x, sigmas[k], cond, None, 2.0)
    torch.testing.assert_close(a.x[:, 0], x, rtol=1e-5, atol=1e-5)
    assert float(a.sigma[0]) == float(sigmas[2]) and float(a.sigma_next[0]) == float(sigmas[3])


def test_per_sample_conditioning_with_prefix_ids_replays_exactly(env):
    """One conditioning unit per sample with token ids after the prompt (t2i_cot's layout): ratio 1 on replay."""
    root, model, prompts = env
    sampling = DMSampling(steps=3, cfg_scale=2.0, window_size=2, window_mode="fixed")
    texts = [p["prompt"] for p in prompts["t2i"][:2]]
    prefix = [model.inputs.encode_text("a red circle"), model.inputs.encode_text("two squares left of")]
    dm = dm_rollout(model, texts, None, "t2i", 1, sampling, torch.Generator().manual_seed(2), prefix_ids=prefix)
    assert dm.prefix_ids == prefix and dm.repeat == 1
    with torch.no_grad():
        res = replay(model, [dm])
        plain = dm_rollout(model, texts, None, "t2i", 1, sampling, torch.Generator().manual_seed(2))
    torch.testing.assert_close(res.log_prob, dm.log_prob, rtol=0, atol=1e-5)
    assert not torch.allclose(plain.final, dm.final)  # the prefix ids change the conditioning
