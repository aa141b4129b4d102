"""Joint LM + DM GRPO (``t2i_cot``, ``reflect``): first-update ratio 1 on both experts, KL 0 at the reference,
gradient routing (the DM loss alone reaches the LM through the query hidden states), separate learning rates,
the judgement flow of ``reflect``, and 4-step runs on a tiny random model."""

from __future__ import annotations

import copy
import csv
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_rl_lm import (
    LENGTH_REWARD,
    LM_REWARDS,
    config,
    encode,
    forced,
    length_reward_registered,
    prompts_of,
    write_task_shards,
)

from unirl.data import verifier
from unirl.rl.lm_policy import TEXT_REWARDS
from unirl.rl.scenario import get_scenario
from unirl.rl.trainer import train_rl

torch.set_num_threads(1)

DM_COMPONENTS = ("dit", "connector", "t2i_queries", "i2i_queries", "ref")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from _rl_worker import small_model

    root = tmp_path_factory.mktemp("rl_joint")
    small_model(root / "tok").save_pretrained(root / "sft")
    return root


@pytest.fixture
def model(root):
    from unirl.models import UnifiedModel

    return UnifiedModel.from_pretrained(root / "sft")


def has_grad(params) -> bool:
    return any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in params)


def no_grad(params) -> bool:
    return all(p.grad is None for _, p in params)


# ------------------------------------------------------------------------------------------------ t2i_cot
@pytest.fixture
def cot(root, model):
    sc = get_scenario("t2i_cot", config(root, "t2i_cot", lr_lm=2e-5, lr_dm=3e-4))
    groups = sc.param_groups(model)
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        rollout = sc.rollout(model, ref, prompts_of("t2i_cot", 2), 2, torch.Generator().manual_seed(0))
    return sc, groups, ref, rollout


def test_t2i_cot_first_update_ratio_is_one_and_kl_zero_on_both_experts(model, cot) -> None:
    sc, _, ref, rollout = cot
    assert rollout.dm.batch_size == 4 and rollout.dm.prefix_ids == rollout.lm.completion_lists()
    assert len(rollout.images) == 4 and rollout.texts == rollout.lm.texts
    loss, stats = sc.loss(model, ref, rollout, torch.tensor([1.0, -1.0, 0.5, -0.5]), 0)
    for side in ("lm", "dm"):
        assert stats[f"{side}/ratio_max_dev"] < 1e-5, side
        assert abs(stats[f"{side}/kl"]) < 1e-7, side
    assert stats["dm/logprob_gap"] < 1e-5  # the SDE rollout's log-probs vs the batched replay
    assert torch.isfinite(loss) and abs(float(loss.detach()) - stats["lm/loss"] - stats["dm/loss"]) < 1e-6


def test_t2i_cot_trains_lm_and_dm_with_separate_learning_rates(model, cot) -> None:
    sc, groups, ref, rollout = cot
    assert {g["name"]: g["lr"] for g in groups} == {"lm": 2e-5, "dm": 3e-4}
    loss, _ = sc.loss(model, ref, rollout, torch.tensor([1.0, -1.0, 0.5, -0.5]), 0)
    loss.backward()  # one backward through L_LM + L_DM
    named = model.parameter_groups()
    for comp in ("lm", "dit", "connector", "t2i_queries"):
        assert has_grad(named[comp]), comp
    for comp in ("vision", "i2i_queries", "ref"):
        assert no_grad(named[comp]), comp


def test_t2i_cot_dm_loss_alone_reaches_the_lm(model, cot) -> None:
    """With the LM loss switched off, the DM loss still moves the LM: through the t2i queries' hidden states."""
    sc, _, ref, rollout = cot
    l_dm, _ = sc.dm_part(model, ref, rollout, torch.tensor([1.0, -1.0, 0.5, -0.5]), 0)
    l_dm.backward()
    named = model.parameter_groups()
    assert has_grad(named["lm"]) and has_grad(named["t2i_queries"]) and has_grad(named["dit"])
    layers = [(n, p) for n, p in named["lm"] if ".layers." in n]
    assert has_grad(layers)  # the transformer layers themselves, not only the embeddings


# ------------------------------------------------------------------------------------------------ reflect
def judgement(model, answer: str) -> list[int]:
    return encode(model, f"<think>checking the image</think><answer>{answer}</answer>") + [model.special.eos]


@pytest.fixture
def reflect(root, model):
    sc = get_scenario("reflect", config(root, "reflect"))
    groups = sc.param_groups(model)
    ref = copy.deepcopy(model).requires_grad_(False)
    prompts = prompts_of("reflect", 2, seed="joint")
    images = [p["images"]["png"] for p in prompts for _ in range(2)]
    texts = [p["prompt"] for p in prompts for _ in range(2)]
    completions = [judgement(model, "edit: make the circle red"), judgement(model, "correct"),
                   judgement(model, "correct"), encode(model, "no answer at all")]
    with torch.no_grad():
        lm = forced(model, ref, texts, images, completions, beta=sc.cfg.beta_lm)
        rollout = sc.apply_judgements(model, prompts, 2, lm, torch.Generator().manual_seed(0))
    return sc, groups, ref, rollout


def test_reflect_applies_the_edits_the_lm_asks_for_and_scores_the_judgement(model, reflect) -> None:
    sc, groups, _, rollout = reflect
    assert [g["name"] for g in groups] == ["lm", "dm"]
    assert rollout.extras["edit_index"] == [0] and rollout.dm.batch_size == 1
    assert rollout.dm.texts == ["make the circle red"] and rollout.dm.task == "i2i"
    assert rollout.dm.ref_latents is not None  # the judged image also feeds the reference path
    judged = rollout.lm.images
    assert [rollout.images[i] is judged[i] for i in range(4)] == [False, True, True, True]
    total, parts = sc.score(rollout)
    metas = rollout.sample_metas()
    verdicts = [m["verdict"] for m in metas]
    expected = [float(verdicts[0] == "incorrect"), float(verdicts[1] == "correct"),
                float(verdicts[2] == "correct"), 0.0]
    assert parts["judgement"] == expected
    assert parts["format"] == [1.0, 1.0, 1.0, 0.0]
    assert parts["geneval"] == [verifier.score(im, m["metadata"])["score"] for im, m in zip(rollout.images, metas)]
    w = sc.cfg.rewards
    want = [w["geneval"] * g + w["judgement"] * j + w["format"] * f
            for g, j, f in zip(parts["geneval"], parts["judgement"], parts["format"])]
    assert torch.allclose(total, torch.tensor(want))


def test_reflect_first_update_ratio_is_one_and_the_dm_loss_reaches_the_lm(model, reflect) -> None:
    sc, _, ref, rollout = reflect
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss, stats = sc.loss(model, ref, rollout, adv, 0)
    for side in ("lm", "dm"):
        assert stats[f"{side}/ratio_max_dev"] < 1e-5, side
        assert abs(stats[f"{side}/kl"]) < 1e-7, side
    assert stats["dm/logprob_gap"] < 1e-5
    assert stats["edit_fraction"] == 0.25
    model.zero_grad()
    l_dm, _ = sc.dm_part(model, ref, rollout, adv, 0)  # the LM loss switched off
    l_dm.backward()
    named = model.parameter_groups()
    for comp in ("lm", "vision", "dit", "connector", "i2i_queries"):
        assert has_grad(named[comp]), comp
    assert no_grad(named["t2i_queries"])
    model.zero_grad()
    loss.backward()
    for comp in ("lm", "vision", "dit", "connector", "i2i_queries"):
        assert has_grad(named[comp]), comp


def test_reflect_without_an_edit_has_a_zero_dm_loss(model, reflect) -> None:
    sc, _, ref, _ = reflect
    prompts = prompts_of("reflect", 1, seed="joint")
    lm = forced(model, ref, [prompts[0]["prompt"]] * 2, [prompts[0]["images"]["png"]] * 2,
                [judgement(model, "correct"), encode(model, "<answer>edit: </answer>")], beta=sc.cfg.beta_lm)
    with torch.no_grad():
        rollout = sc.apply_judgements(model, prompts, 2, lm, torch.Generator().manual_seed(0))
    assert rollout.dm is None and rollout.extras["edit_index"] == []
    loss, stats = sc.loss(model, ref, rollout, torch.tensor([1.0, -1.0]), 0)
    assert stats["dm/loss"] == 0.0 and "dm/kl" not in stats and torch.isfinite(loss)


def test_reflect_judges_its_own_generations_against_the_verifier(model, reflect) -> None:
    sc = reflect[0]
    sc.own_generation_share = 1.0
    prompts = prompts_of("reflect", 3, seed="own")
    originals = [(p["verdict"], p["images"]["png"]) for p in prompts]
    with torch.no_grad():
        out = sc.with_own_generations(model, prompts, torch.Generator().manual_seed(0))
    for p, o in zip(prompts, out):
        im = o["images"]["png"]
        assert im is not p["images"]["png"] and im.size == (32, 32)
        ok = verifier.score(im, p["metadata"])["correct"]
        assert o["verdict"] == ("correct" if ok else "incorrect") and o["metadata"] == p["metadata"]
    assert [(p["verdict"], p["images"]["png"]) for p in prompts] == originals  # the shard records are not mutated


# ------------------------------------------------------------------------------------------------ 4-step runs
def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["t2i_cot", "reflect"])
def test_joint_scenarios_run_four_steps(root, scenario) -> None:
    write_task_shards(root, scenario)
    # spread for a random model: completion length (text) and JPEG size (images)
    rewards = {**LM_REWARDS[scenario], LENGTH_REWARD: 1.0, "jpeg_compressibility": 1.0}
    cfg = config(root, scenario, f"run_{scenario}", rewards=rewards)
    sc = get_scenario(scenario, cfg)
    sc.text_rewards = TEXT_REWARDS | {LENGTH_REWARD}
    with length_reward_registered():
        summary = train_rl(cfg, scenario=sc)
    headline = {"t2i_cot": "geneval_score", "reflect": "judgement_accuracy"}[scenario]
    assert summary["steps"] == 4 and summary["nan_steps"] == 0 and summary["headline"] == headline
    rows = list(csv.DictReader((Path(cfg.reports_dir) / "reward_curve.csv").open()))
    assert len(rows) == 4 and all(float(r["loss/lm/ratio_max_dev"]) < 1e-5 for r in rows)
    before = load_file(str(root / "sft" / "model.safetensors"))
    after = load_file(str(Path(cfg.out_dir) / "model.safetensors"))
    assert _changed(before, after, "lm.model.language_model.")
    if scenario == "t2i_cot":
        for prefix in ("dit.", "connector.", "t2i_queries"):
            assert _changed(before, after, prefix), prefix
        for prefix in ("i2i_queries", "ref_proj.", "lm.model.visual."):
            assert not _changed(before, after, prefix), prefix
    else:  # the DM trains exactly when some judgement asked for an edit
        edited = any(float(r["loss/edit_fraction"]) > 0 for r in rows)
        assert _changed(before, after, "dit.") == edited
        assert not _changed(before, after, "t2i_queries")
