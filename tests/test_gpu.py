"""The same checks as the CPU suite, on a CUDA device: first-update ratio 1 for the DM, LM and joint scenarios,
gradient routing, the SDE log-prob against an independent Gaussian density, bf16 autocast SFT losses, seeded
sampling, and a checkpoint saved on the GPU that loads on the CPU bit for bit.

Marked ``gpu``: CI runs ``-m "not gpu"``; on a machine without CUDA every test here is skipped. TF32 is switched
off in the fixture so that the fp32 checks keep the CPU suite's tolerances (1e-5).
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from _rl_worker import check_rollout_log_probs_against_gaussian, grad_components, rl_config, small_model, write_data
from test_rl_lm import config as lm_config
from test_rl_lm import prompts_of

from unirl.models import UnifiedModel
from unirl.rl.flow_sde import sde_step
from unirl.rl.prompts import load_prompts
from unirl.rl.scenario import get_scenario
from unirl.train.losses import flow_matching_loss, lm_loss

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    root = tmp_path_factory.mktemp("gpu")
    shards = write_data(root, n_train=4, n_test=2)
    model = small_model(root / "tok")
    torch.manual_seed(1)
    torch.nn.init.normal_(model.ref_proj.weight, std=0.02)  # the editing rollout must depend on the reference path
    prompts = {t: load_prompts(shards, t, "train") for t in ("t2i", "edit")}
    return root, model.to(CUDA), prompts


def _nonzero_grads(model: UnifiedModel) -> set[str]:
    return grad_components(model)["nonzero"]


def _lm_side(env, scenario_name: str, group_size: int):
    """Policy and frozen reference copies of the env's model, the LM-side scenario (rewards as ``test_rl_lm``) and
    a rollout of two of its prompts."""
    root, base, _ = env
    model = copy.deepcopy(base)
    ref = copy.deepcopy(base).requires_grad_(False)
    scenario = get_scenario(scenario_name, lm_config(root, scenario_name))
    scenario.param_groups(model)
    with torch.no_grad():
        rollout = scenario.rollout(model, ref, prompts_of(scenario_name, 2), group_size,
                                   torch.Generator().manual_seed(0))
    return model, ref, scenario, rollout


def test_model_lives_on_the_gpu(env):
    _, model, _ = env
    assert model.device.type == "cuda" and all(p.is_cuda for p in model.parameters())


@pytest.mark.parametrize("name", ["t2i", "edit"])
def test_dm_first_update_ratio_is_one_and_gradients_reach_exactly_the_scenario_params(env, name):
    root, base, prompts = env
    model = copy.deepcopy(base)
    cfg = rl_config(root, name, "unused", cfg_scale=3.0, ref_cfg_scale=1.5, sde_steps=4, sde_window_size=2,
                    beta_dm=0.0)
    scenario = get_scenario(name, cfg)
    scenario.param_groups(model)
    rollout = scenario.rollout(model, model, prompts[name][:2], 2, torch.Generator().manual_seed(3))
    assert rollout.dm.x.is_cuda and rollout.dm.log_prob.shape == (4, 2)
    loss, stats = scenario.loss(model, model, rollout, torch.tensor([1.0, -1.0, 0.5, -0.5], device=CUDA), 0)
    assert stats["ratio_max_dev"] < 1e-5 and stats["logprob_gap"] < 1e-5, stats
    loss.backward()
    expected = {"t2i": {"dit", "connector", "t2i_queries"}, "edit": {"dit", "connector", "i2i_queries", "ref"}}[name]
    assert _nonzero_grads(model) == expected
    assert all(p.grad is None for _, p in model.parameter_groups()["lm"])


def test_lm_first_update_ratio_is_one_and_only_the_lm_learns(env):
    model, ref, scenario, rollout = _lm_side(env, "understand", 3)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5, -0.5, 0.0], device=CUDA)
    loss, stats = scenario.loss(model, ref, rollout, adv, 0)
    assert stats["ratio_max_dev"] < 1e-5 and abs(stats["kl"]) < 1e-6, stats
    loss.backward()
    assert _nonzero_grads(model) <= {"lm", "vision"} and "lm" in _nonzero_grads(model)


def test_joint_t2i_cot_ratio_is_one_on_both_experts_and_the_lm_hears_the_dm_loss(env):
    model, ref, scenario, rollout = _lm_side(env, "t2i_cot", 2)
    loss, stats = scenario.loss(model, ref, rollout, torch.tensor([1.0, -1.0, 0.5, -0.5], device=CUDA), 0)
    for side in ("lm", "dm"):
        assert stats[f"{side}/ratio_max_dev"] < 1e-5, (side, stats)
    loss.backward()  # one backward through L_LM + L_DM
    assert {"lm", "dit", "connector", "t2i_queries"} <= _nonzero_grads(model)


def test_sde_log_prob_matches_an_independent_gaussian_density(env):
    _, model, prompts = env
    k = 1
    dm = check_rollout_log_probs_against_gaussian(model, [p["prompt"] for p in prompts["t2i"][:2]], k)
    with torch.no_grad():
        v = model.guided_velocity(dm.x[:, k], dm.sigma[k], model.encode(dm.texts, None, "t2i").repeat_interleave(2),
                                  None, 2.0)
    # the public step with given noise: x_next = mean + std * noise, and the same density
    noise = torch.randn(dm.x[:, k].shape, device=CUDA)
    x_next, log_prob, m2, s2 = sde_step(dm.x[:, k], v, dm.sigma[k], dm.sigma_next[k], 0.8, noise=noise)
    torch.testing.assert_close(x_next, m2 + s2 * noise)
    ref = torch.distributions.Normal(m2.double(), s2.double()).log_prob(x_next.double()).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob.double(), ref, rtol=0, atol=1e-5)


def test_bf16_autocast_sft_losses_are_finite_and_reach_exactly_the_trained_side(env):
    _, base, prompts = env
    model = copy.deepcopy(base)
    trainable = {id(p) for p in model.set_trainable("dm_sft")}
    texts = [p["prompt"] for p in prompts["t2i"][:2]]
    x0 = torch.randn(2, *model.latent_shape, device=CUDA)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        cond = model.encode(texts, None, "t2i")
        loss = flow_matching_loss(model, x0, cond, generator=torch.Generator(CUDA).manual_seed(0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    for comp, named in model.parameter_groups().items():
        for name, p in named:
            if comp in ("dit", "connector", "t2i_queries"):  # what a T2I batch trains
                assert id(p) in trainable and p.grad is not None and torch.isfinite(p.grad).all(), name
            elif comp == "i2i_queries":  # trained by editing batches only
                assert p.grad is None or not p.grad.any(), f"{name} got a gradient from a T2I batch"
            elif comp == "ref":  # the reference path: T2I batches run it on zero latents (its bias still learns)
                assert id(p) in trainable and (p.grad is None or torch.isfinite(p.grad).all()), name
            else:  # frozen (LM, vision tower, VAE): no gradient at all
                assert p.grad is None, f"frozen {comp}: {name} got a gradient"
    lm_model = copy.deepcopy(base)
    lm_model.set_trainable("lm")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ce = lm_loss(lm_model, ["what is 2 + 2?"], ["<think>2 + 2 = 4</think><answer>4</answer>"])
    assert torch.isfinite(ce) and float(ce) > 0
    ce.backward()
    assert all(p.grad is None for _, p in lm_model.parameter_groups()["dit"])


def test_sampling_on_the_gpu_is_seeded(env):
    _, model, prompts = env
    texts = [p["prompt"] for p in prompts["t2i"][:2]]
    a = model.generate_images(texts, steps=3, seed=0)
    b = model.generate_images(texts, steps=3, seed=0)
    assert [im.size for im in a] == [(32, 32)] * 2
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    t1 = model.generate_text(texts, max_new_tokens=8, temperature=1.0, seed=7)
    t2 = model.generate_text(texts, max_new_tokens=8, temperature=1.0, seed=7)
    assert t1 == t2


def test_a_checkpoint_saved_on_the_gpu_loads_on_the_cpu_exactly(env, tmp_path: Path):
    _, model, _ = env
    model.save_pretrained(tmp_path / "ckpt")
    loaded = UnifiedModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.device.type == "cpu"
    gpu_state = {k: v.cpu() for k, v in model.state_dict().items()}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, gpu_state[k]), k
