"""LM-side GRPO: rollout layout, first-update ratio, KL to the reference, EOS masking, rewards on malformed and
multi-line completions, gradient routing of ``understand`` / ``prompt_refine``, and 4-step runs of both."""

from __future__ import annotations

import contextlib
import copy
import doctest
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _rl_worker import registered_reward, small_model, train_both_signs
from safetensors.torch import load_file

import unirl.rewards.judge as judge_module
import unirl.rl.lm_policy as lm_policy_module
from unirl.data import tasks
from unirl.data.shard_writer import write_shards
from unirl.models.outputs import TextSamples
from unirl.rewards.judge import judgement_reward
from unirl.rewards.text import answer_accuracy, format_reward
from unirl.rl.grpo import group_advantages
from unirl.rl.lm_policy import (
    TEXT_REWARDS,
    LMRollout,
    group_logprobs,
    lm_loss,
    lm_rollout,
    lm_rollout_from_samples,
    pad_completions,
    repeat_group,
    rollout_logprobs,
    score_rewards,
)
from unirl.rl.scenario import get_scenario
from unirl.rl.trainer import RLConfig, train_rl
from unirl.train.engine import EngineConfig

torch.set_num_threads(1)

LM_REWARDS = {
    "understand": {"answer_accuracy": 1.0, "format": 0.5},
    "prompt_refine": {"geneval_complete": 1.0, "format": 0.5},  # params.yaml's reward
    "t2i_cot": {"geneval": 1.0, "format": 0.5},
    "reflect": {"geneval": 1.0, "judgement": 1.0, "format": 0.5},
}


# ------------------------------------------------------------------------------------------------ fixtures
def prompts_of(task: str, n: int, seed: str = "lm-test") -> list[dict]:
    """Prompt dicts as the trainer builds them (shard meta + key + images), from the real task generators."""
    rng = random.Random(f"{seed}-{task}")
    out = []
    for i in range(n):
        s = tasks.generate(task, rng, 32)
        out.append({**s.meta, "key": f"{task}_{i}", "images": dict(s.images)})
    return out


def write_task_shards(root: Path, task: str, n_train: int = 8, n_test: int = 4) -> Path:
    rng = random.Random(f"rl-lm-{task}")
    items = [(f"{task}_{i:04d}", "train" if i < n_train else "test", tasks.generate(task, rng, 32))
             for i in range(n_train + n_test)]
    write_shards(items, root / "shards", task)
    return root / "shards"


def config(root: Path, scenario: str, tag: str = "", **kw) -> RLConfig:
    base = dict(
        scenario=scenario, init_dir=str(root / "sft"), shards_dir=str(root / "shards"),
        out_dir=str(root / tag / "model"), reports_dir=str(root / tag / "reports"), run_dir=str(root / tag / "run"),
        steps=4, prompts_per_step=2, group_size=2, sde_steps=3, sde_window_size=2, max_new_tokens=10,
        eval_prompts=2, eval_batch_size=4, grid_prompts=2, tracking=False, progress=False,
        rewards=LM_REWARDS[scenario], lr_lm=1e-3, lr_dm=1e-3, beta_lm=0.05, beta_dm=0.01,
        engine=EngineConfig(grad_clip=1.0),
    )
    base.update(kw)
    return RLConfig(**base)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl_lm")
    small_model(root / "tok").save_pretrained(root / "sft")
    return root


@pytest.fixture
def model(root):
    from unirl.models import UnifiedModel

    return UnifiedModel.from_pretrained(root / "sft")


def encode(model, text: str) -> list[int]:
    return model.inputs.encode_text(text)


def forced(model, ref, prompts: list[str], images, completions: list[list[int]], beta: float = 0.0) -> LMRollout:
    samples = TextSamples(texts=[""] * len(completions), completion_ids=completions,
                          finished=[model.special.eos in c for c in completions])
    return lm_rollout_from_samples(model, ref, prompts, images, samples, temperature=1.0, beta=beta)


def lm_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ------------------------------------------------------------------------------------------------ pure helpers
def test_doctests() -> None:
    for module in (lm_policy_module, judge_module):
        result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_pad_completions_masks_up_to_and_including_the_first_eos() -> None:
    EOS, PAD = 2, 0
    ids, mask = pad_completions([[5, 6, EOS, 7, 8], [9, EOS], [4, 4, 4]], EOS, PAD)
    assert ids.tolist() == [[5, 6, EOS], [9, EOS, PAD], [4, 4, 4]]  # tokens after the first EOS are dropped
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0], [1, 1, 1]]  # EOS included; no EOS: all sampled tokens
    assert repeat_group(["a", "b"], 3) == ["a", "a", "a", "b", "b", "b"]


# ------------------------------------------------------------------------------------------------ rollout + loss
def test_rollout_groups_samples_and_the_first_update_ratio_is_one(model) -> None:
    prompts = prompts_of("understand", 3)
    texts = [p["prompt"] for p in prompts]
    images = [p["images"].get("png") for p in prompts]
    model.set_trainable("lm")
    ref = copy.deepcopy(model).requires_grad_(False)
    rollout = lm_rollout(model, ref, texts, images, group_size=3, temperature=1.0, max_new_tokens=12,
                         generator=torch.Generator().manual_seed(0), beta=0.05, record_old=True)
    assert rollout.prompts == [t for t in texts for _ in range(3)] and rollout.group_size == 3
    assert rollout.images == [im for im in images for _ in range(3)]
    B, L = rollout.completion_ids.shape
    assert B == 9 and rollout.mask.shape == (B, L) and rollout.old_logp.shape == (B, L)
    eos = model.special.eos
    for row, m, done in zip(rollout.completion_ids.tolist(), rollout.mask.tolist(), rollout.finished):
        n = int(sum(m))
        assert m == [1.0] * n + [0.0] * (L - n)
        assert (row[n - 1] == eos) == done and eos not in row[: n - 1]
    assert bool((rollout.old_logp[rollout.mask == 0] == 0).all())
    adv = group_advantages(torch.randn(B), 3)
    loss, stats = lm_loss(model, rollout, adv, clip_eps=0.2, beta=0.05, update_index=0)
    assert stats["ratio_max_dev"] < 1e-5 and stats["logprob_gap"] < 1e-5 and stats["clip_fraction"] == 0.0
    loss.backward()
    assert torch.isfinite(loss)


def test_grouped_teacher_forcing_matches_the_models_completion_logprobs(model) -> None:
    """The prompt run once per group (KV cache repeated G times) gives the log-probs of the model's own
    teacher-forcing layout, with and without images."""
    prompts = prompts_of("understand", 4, seed="tf")
    texts = [p["prompt"] for p in prompts]
    images = [p["images"].get("png") for p in prompts]
    assert any(im is None for im in images) and any(im is not None for im in images)
    for ims in (images, None):
        rollout = lm_rollout(model, None, texts, ims, group_size=3, temperature=0.7, max_new_tokens=10,
                             generator=torch.Generator().manual_seed(2), beta=0.0)
        with torch.no_grad():
            grouped = rollout_logprobs(model, rollout)  # (B, L)
            flat, mask = model.completion_logprobs(rollout.prompts, rollout.completion_lists(), rollout.images,
                                                   temperature=0.7)  # (B, T)
        assert torch.equal(mask.float(), rollout.mask[:, : mask.shape[1]])
        assert torch.allclose(grouped[:, : flat.shape[1]], flat, atol=1e-5)
    with pytest.raises(ValueError, match="does not share the prompt"):
        group_logprobs(model, ["a", "b"], None, torch.ones(2, 3, dtype=torch.long), 2, 1.0)


def test_update_zero_stores_the_old_logprobs_for_later_inner_updates(model) -> None:
    model.set_trainable("lm")
    texts = [p["prompt"] for p in prompts_of("understand", 2)]
    rollout = lm_rollout(model, None, texts, None, group_size=2, temperature=1.0, max_new_tokens=8,
                         generator=torch.Generator().manual_seed(3), beta=0.0)
    assert rollout.old_logp is None
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    with pytest.raises(ValueError, match="no old log-probs for inner update 1"):
        lm_loss(model, rollout, adv, clip_eps=0.2, beta=0.0, update_index=1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss, stats = lm_loss(model, rollout, adv, clip_eps=0.2, beta=0.0, update_index=0)
    assert stats["ratio_max_dev"] == 0.0 and "logprob_gap" not in stats
    stored = rollout.old_logp.clone()
    assert stored.shape == rollout.mask.shape and not stored.requires_grad
    loss.backward()
    opt.step()
    _, stats1 = lm_loss(model, rollout, adv, clip_eps=0.2, beta=0.0, update_index=1)
    assert torch.equal(rollout.old_logp, stored) and stats1["ratio_max_dev"] > 1e-4  # the policy moved


def test_kl_is_zero_when_the_policy_is_the_reference(model) -> None:
    model.set_trainable("lm")
    ref = copy.deepcopy(model).requires_grad_(False)
    texts = [p["prompt"] for p in prompts_of("understand", 2)]
    rollout = lm_rollout(model, ref, texts, None, group_size=2, temperature=0.7, max_new_tokens=8,
                         generator=torch.Generator().manual_seed(1), beta=0.5)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss_kl, stats = lm_loss(model, rollout, adv, clip_eps=0.2, beta=0.5)
    loss_kl.backward()
    g_kl = lm_grads(model)
    model.zero_grad()
    loss_0, _ = lm_loss(model, rollout, adv, clip_eps=0.2, beta=0.0)
    loss_0.backward()
    g_0 = lm_grads(model)
    assert stats["kl"] < 1e-7
    assert torch.allclose(loss_kl, loss_0, atol=1e-7)
    assert set(g_kl) == set(g_0) and all(torch.allclose(g_kl[k], g_0[k], atol=1e-7) for k in g_0)
    with torch.no_grad():  # a policy that moved away from the reference has a positive KL
        model.lm.lm_head.weight.add_(0.05 * torch.randn_like(model.lm.lm_head.weight))
    assert lm_loss(model, rollout, adv, clip_eps=0.2, beta=0.5)[1]["kl"] > 1e-4


def test_tokens_after_the_first_eos_carry_no_loss(model) -> None:
    """Two rollouts that differ only after the first EOS give the same loss and gradient, equal to an independent
    computation of -(1/B) sum_i A_i / |y_i| sum_l logp_il over the tokens up to the EOS (ratio 1, beta 0)."""
    model.set_trainable("lm")
    eos = model.special.eos
    head = [encode(model, "<think>two circles</think><answer>2</answer>"), encode(model, "<answer>red</answer>")]
    tails_a = [encode(model, "a red square"), encode(model, "make the circle blue")]
    tails_b = [encode(model, "three"), []]
    prompts = ["How many circles are in the image?", "What colour is the square?"]
    adv = torch.tensor([1.5, -0.5])
    grads, losses = [], []
    for tails in (tails_a, tails_b):
        model.zero_grad()
        r = forced(model, None, prompts, None, [h + [eos] + t for h, t in zip(head, tails)])
        assert r.lengths == [len(h) + 1 for h in head]
        loss, _ = lm_loss(model, r, adv, clip_eps=0.2, beta=0.0)
        loss.backward()
        losses.append(loss.detach())
        grads.append(lm_grads(model))
    model.zero_grad()
    logp, mask = model.completion_logprobs(prompts, [h + [eos] for h in head], temperature=1.0)  # (B, T)
    surrogate = -((adv[:, None] * logp * mask).sum(1) / mask.sum(1)).mean()
    surrogate.backward()
    expected = lm_grads(model)
    assert torch.allclose(losses[0], losses[1]) and torch.allclose(losses[0], -adv.mean(), atol=1e-6)
    for g in grads:
        assert set(g) == set(expected)
        assert all(torch.allclose(g[k], expected[k], atol=1e-6, rtol=1e-4) for k in expected)


def test_lm_loss_needs_reference_logprobs_when_beta_is_positive(model) -> None:
    r = forced(model, None, ["a prompt"], None, [encode(model, "<answer>x</answer>") + [model.special.eos]])
    with pytest.raises(ValueError, match="beta_lm=0.1 but the rollout has no reference"):
        lm_loss(model, r, torch.zeros(1), clip_eps=0.2, beta=0.1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        lm_rollout(model, None, ["p"], None, 2, temperature=0.0, max_new_tokens=4)


def test_control_tokens_are_cut_before_teacher_forcing(model) -> None:
    sp = model.special
    ids = encode(model, "<think>a") + [sp.image_pad] + encode(model, "b") + [sp.eos]
    r = forced(model, None, ["q"], None, [ids])
    assert r.completion_lists() == [ids[: ids.index(sp.image_pad)]] and r.finished == [False]
    assert r.texts == ["<think>a"]


# ------------------------------------------------------------------------------------------------ rewards
MULTILINE = "<think>\nthere are two circles\nand one square\n</think>\n<answer>\n3\n</answer>\n"
MALFORMED = ["", "3", "<answer>3", "<answer>3</answer><think>x</think>", "<think>x</think><think>y</think>",
             "<think></think><answer></answer>", "\x00<|im_end|>", None]


def test_format_reward_reads_tags_across_lines() -> None:
    assert format_reward([MULTILINE], ["q"], [{}]) == [1.0]
    assert answer_accuracy([MULTILINE], ["q"], [{"answer": "three"}]) == [1.0]
    judged = "<think>\nthe circle\nis blue\n</think>\n<answer>\nedit: make the circle red\n</answer>"
    assert judgement_reward([judged], ["p"], [{"verdict": "incorrect"}]) == [1.0]


def test_malformed_completions_score_zero_without_an_exception(model) -> None:
    n = len(MALFORMED)
    assert format_reward(MALFORMED, ["q"] * n, [{}] * n) == [0.0] * n
    assert answer_accuracy(MALFORMED, ["q"] * n, [{"answer": "7"}] * n) == [0.0] * n
    assert judgement_reward(MALFORMED, ["q"] * n, [{"verdict": "correct"}] * n) == [0.0] * n
    # through a scenario's score: a rollout whose completions are malformed
    texts = [t for t in MALFORMED if t]
    total, parts = score_rewards(LM_REWARDS["understand"], texts, None, ["q"] * len(texts),
                                 [{"answer": "7"}] * len(texts))
    assert total.tolist() == [0.0] * len(texts) and set(parts) == {"answer_accuracy", "format"}
    with pytest.raises(ValueError, match=r"reward\(s\) \['geneval'\] score images"):
        score_rewards({"geneval": 1.0}, texts, None, ["q"] * len(texts), [{}] * len(texts))


def test_prompt_refine_scores_a_missing_rewrite_zero(root, model) -> None:
    cfg = config(root, "prompt_refine")
    sc = get_scenario("prompt_refine", cfg)
    prompts = prompts_of("prompt_refine", 1)
    ok = encode(model, f"<think>the user wants it</think><answer>{prompts[0]['rewrite']}</answer>")
    bad = encode(model, "a photo of nothing")
    lm = forced(model, None, [prompts[0]["prompt"]] * 2, None, [ok + [model.special.eos], bad])
    with torch.no_grad():
        images = sc.draw(model, [prompts[0]["rewrite"], None], [3, 3])
    from unirl.rl.scenario import Rollout

    rollout = Rollout(prompts=prompts, group_size=2, lm=lm, images=images, texts=lm.texts)
    total, parts = sc.score(rollout)
    assert parts["format"] == [1.0, 0.0] and parts["geneval_complete"][1] == 0.0 and total[1] == 0.0


# ------------------------------------------------------------------------------------------------ scenarios
@pytest.mark.parametrize("scenario", ["understand", "prompt_refine"])
def test_lm_scenarios_route_gradients_to_the_lm_only(root, model, scenario) -> None:
    cfg = config(root, scenario)
    sc = get_scenario(scenario, cfg)
    groups = sc.param_groups(model)
    assert [g["name"] for g in groups] == ["lm"] and groups[0]["lr"] == cfg.lr_lm
    ref = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        rollout = sc.rollout(model, ref, prompts_of(scenario, 2), 2, torch.Generator().manual_seed(0))
    loss, stats = sc.loss(model, ref, rollout, torch.tensor([1.0, -1.0, 0.3, -0.3]), 0)
    assert stats["ratio_max_dev"] < 1e-5 and stats["kl"] < 1e-7
    loss.backward()
    named = model.parameter_groups()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for _, p in named["lm"])
    for comp in ("dit", "connector", "t2i_queries", "i2i_queries", "ref"):
        assert all(p.grad is None and not p.requires_grad for _, p in named[comp]), comp


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


LENGTH_REWARD = "test_completion_length"


@contextlib.contextmanager
def length_reward_registered() -> Iterator[str]:
    """A text reward with spread on a random model (its accuracy, format, judgement and verifier rewards are all 0,
    so the advantages would all be 0 and nothing would train)."""

    def completion_length(samples, prompts, metadata):
        return [len(s) / 100 for s in samples]

    with registered_reward(LENGTH_REWARD, completion_length) as name:
        yield name


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["understand", "prompt_refine"])
def test_lm_scenarios_run_four_steps_and_leave_the_dm_unchanged(root, scenario) -> None:
    write_task_shards(root, scenario)
    cfg = config(root, scenario, f"run_{scenario}", rewards={**LM_REWARDS[scenario], LENGTH_REWARD: 1.0})
    sc = get_scenario(scenario, cfg)
    if scenario == "prompt_refine":
        sc.text_rewards = TEXT_REWARDS | {LENGTH_REWARD}
    with length_reward_registered():
        summary = train_rl(cfg, scenario=sc)
    headline = {"understand": "answer_accuracy", "prompt_refine": "geneval_score"}[scenario]
    assert summary["steps"] == 4 and summary["nan_steps"] == 0 and summary["headline"] == headline
    if scenario == "prompt_refine":  # the frozen generator does not move: raw-prompt images score the same
        assert summary["before"]["raw_geneval_score"] == summary["after"]["raw_geneval_score"]
        tags = {k.split("/", 1)[1] for k in summary["after"] if k.startswith("score/")}
        assert tags and tags == {k.split("/", 1)[1] for k in summary["after"] if k.startswith("raw_score/")}
        assert all(summary["before"][f"raw_score/{t}"] == summary["after"][f"raw_score/{t}"] for t in tags)
    before = load_file(str(root / "sft" / "model.safetensors"))
    after = load_file(str(Path(cfg.out_dir) / "model.safetensors"))
    assert _changed(before, after, "lm.model.language_model.")
    for prefix in ("dit.", "connector.", "t2i_queries", "i2i_queries", "ref_proj.", "ref_patch_embed."):
        assert not _changed(before, after, prefix), prefix


def test_lm_grpo_moves_the_policy_in_the_direction_of_the_rewards_sign(root) -> None:
    """The LM engine optimises: rewarding +completion length lengthens the sampled completions, -length shortens them.

    Judged on the saved models' samples at a fixed seed (48 completions of 6 held-out questions).
    """
    from unirl.models import UnifiedModel

    write_task_shards(root, "understand")
    questions = prompts_of("understand", 6, seed="direction") * 8
    texts = [p["prompt"] for p in questions]
    images = [p.get("images", {}).get("png") for p in questions]

    def mean_length(path: Path) -> float:
        out = UnifiedModel.from_pretrained(path).sample_text(texts, images, max_new_tokens=10, temperature=1.0,
                                                             seed=3)
        return sum(len(t) for t in out.texts) / len(out.texts)

    models = train_both_signs("test_length", lambda text: len(text) / 100, lambda name: config(
        root, "understand", f"run_{name}", steps=16, group_size=4, lr_lm=3e-3, rewards={name: 1.0}))
    finals = {sign: mean_length(path) for sign, path in models.items()}
    start = mean_length(root / "sft")
    assert finals[1] > start + 1.0 and finals[-1] < start - 1.0, (start, finals)  # measured 18.9 -> 21.5 / 15.9
