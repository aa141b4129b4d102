"""The GRPO loop (``train_rl``) on a small random model: outputs, frozen/trained parameters, failing rewards, NaN
losses, the time budget, config loading, resume after a kill, and a 2-process run whose ranks agree."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from _rl_worker import param_digest, prepare, rl_config, train_both_signs
from safetensors.torch import load_file

from unirl.rewards import RewardError, register, unregister
from unirl.rl.scenario import ScenarioBase, get_scenario, param_groups
from unirl.rl.scenarios.t2i import T2IScenario
from unirl.rl.trainer import RLConfig, load_rl_config, train_rl
from unirl.train.checkpoint import CheckpointError, load_checkpoint

torch.set_num_threads(1)
WORKER = Path(__file__).with_name("_rl_worker.py")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl_trainer")
    prepare(root)
    return root


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a if k.startswith(prefix))


@pytest.mark.slow
def test_train_rl_t2i_writes_every_output_and_trains_only_the_dm_side(root):
    cfg = rl_config(root, "t2i", "run_t2i", steps=2, checkpoint_every=1)
    summary = train_rl(cfg)
    assert summary["steps"] == 2 and summary["nan_steps"] == 0 and not summary["stopped_early"]
    assert summary["headline"] == "geneval_score"
    assert list(summary["before"])[:2] == ["geneval_score", "geneval_correct"]
    assert set(summary["delta"]) == set(summary["before"])
    reports = Path(cfg.reports_dir)
    metrics = json.loads((reports / "metrics.json").read_text())
    assert metrics["before"] == summary["before"] and metrics["after"] == summary["after"]
    rows = list(csv.DictReader((reports / "reward_curve.csv").open()))
    assert [r["step"] for r in rows] == ["1", "2"]
    for key in ("reward/mean", "reward/geneval/mean", "loss/kl", "loss/clip_fraction", "loss/logprob_gap",
                "grad_norm", "time/rollout_s", "time/score_s", "time/loss_s"):
        assert rows[0][key] != "", key
    assert float(rows[0]["loss/logprob_gap"]) < 1e-5  # rollout and loss see identical inputs
    assert (reports / "reward_curve.png").stat().st_size > 0
    assert (reports / "samples_before_after.png").stat().st_size > 0
    assert sorted(p.name for p in Path(cfg.run_dir).iterdir()) == ["step-000001", "step-000002"]
    before, after = _weights(root / "sft"), _weights(Path(cfg.out_dir))
    assert set(before) == set(after)
    for prefix in ("dit.", "connector.", "t2i_queries"):
        assert _changed(before, after, prefix), prefix
    for prefix in ("lm.", "i2i_queries", "ref_proj.", "ref_patch_embed."):
        assert not _changed(before, after, prefix), prefix
    # the run directory now holds checkpoints of this config: a different one must not silently resume from them
    with pytest.raises(CheckpointError, match="different rl config.*lr_dm"):
        train_rl(rl_config(root, "t2i", "run_t2i", steps=3, lr_dm=5e-4))
    # the budget counts the time earlier invocations spent: rerun with a budget that time has used up, the run
    # trains no further (what `dvc repro` does to a stage the clock stopped) and evaluates the same model again
    spent = load_checkpoint(Path(cfg.run_dir) / "step-000002").extra["elapsed_s"]
    assert 0 < spent <= summary["minutes"] * 60
    again = train_rl(rl_config(root, "t2i", "run_t2i", steps=4, max_minutes=spent / 60))
    assert again["steps"] == 2 and again["stopped_early"] and again["after"] == summary["after"]
    assert again["trainable_sha256"] == summary["trainable_sha256"] and again["minutes"] > summary["minutes"]
    assert sorted(p.name for p in Path(cfg.run_dir).iterdir()) == ["step-000001", "step-000002"]
    # fewer steps than the run already has: an error that says what to do, not the longer run reported as this one
    with pytest.raises(CheckpointError, match="step 2 of a run, past rl.steps = 1: delete"):
        train_rl(rl_config(root, "t2i", "run_t2i", steps=1))


@pytest.mark.slow
def test_train_rl_edit_one_step_tracked_in_mlflow(root, tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    cfg = rl_config(root, "edit", "run_edit", steps=1, tracking=True, experiment="rl_edit_test")
    summary = train_rl(cfg)
    assert summary["headline"] == "edit_correctness" and summary["steps"] == 1
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["run_url"].rsplit("/", 1)[-1])
    assert run.info.status == "FINISHED" and run.data.tags["scenario"] == "edit"
    assert run.data.tags["latest_checkpoint_step"] == "1"  # the checkpoint is a logged model
    assert {"reward/mean", "loss/kl", "grad_norm", "eval/edit_correctness"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "metrics.json" in artifacts
    rows = list(csv.DictReader((Path(cfg.reports_dir) / "reward_curve.csv").open()))
    assert {"reward/edit_correctness/mean", "reward/cycle_consistency/mean"} <= set(rows[0])
    assert float(rows[0]["loss/logprob_gap"]) < 1e-5
    before, after = _weights(root / "sft"), _weights(Path(cfg.out_dir))
    for prefix in ("dit.", "connector.", "i2i_queries", "ref_proj."):
        assert _changed(before, after, prefix), prefix
    for prefix in ("lm.", "t2i_queries"):
        assert not _changed(before, after, prefix), prefix


def test_a_failing_reward_stops_the_run_with_its_name(root):
    @register("test_nan_reward")
    def nan_reward(samples, prompts, metadata):
        return [float("nan")] * len(samples)

    try:
        cfg = rl_config(root, "t2i", "run_nan_reward", steps=1, eval_prompts=1,
                        rewards={"geneval": 1.0, "test_nan_reward": 0.5})
        with pytest.raises(RewardError, match="test_nan_reward"):
            train_rl(cfg)
    finally:
        unregister("test_nan_reward")


class NaNLossT2I(T2IScenario):
    """The t2i scenario whose loss is NaN on the first ``n_bad`` calls (a diverged update)."""

    def __init__(self, cfg: RLConfig, n_bad: int) -> None:
        super().__init__(cfg)
        self.calls, self.n_bad = 0, n_bad

    def loss(self, model, ref_model, rollout, advantages, update_index):
        loss, stats = super().loss(model, ref_model, rollout, advantages, update_index)
        self.calls += 1
        return (loss * float("nan") if self.calls <= self.n_bad else loss), stats


def test_a_nan_loss_skips_the_step_and_stops_after_the_configured_count(root):
    cfg = rl_config(root, "t2i", "run_nan_stop", steps=4, eval_prompts=1, max_nan_steps=2)
    with pytest.raises(RuntimeError, match=r"2 steps had a NaN/Inf loss \(rl.max_nan_steps = 2\)"):
        train_rl(cfg, scenario=NaNLossT2I(cfg, n_bad=10))
    cfg = rl_config(root, "t2i", "run_nan_skip", steps=2, eval_prompts=1, max_nan_steps=3)
    summary = train_rl(cfg, scenario=NaNLossT2I(cfg, n_bad=1))
    assert summary["nan_steps"] == 1 and summary["steps"] == 2
    rows = list(csv.DictReader((Path(cfg.reports_dir) / "reward_curve.csv").open()))
    assert [r["skipped"] for r in rows] == ["1.0", "0.0"]
    assert rows[0]["loss/total"] == "" and rows[1]["loss/total"] != ""


def test_the_time_budget_stops_the_loop_and_still_evaluates(root):
    cfg = rl_config(root, "t2i", "run_budget", steps=50, eval_prompts=1, max_minutes=1e-4)
    summary = train_rl(cfg)
    assert summary["stopped_early"] and summary["steps"] == 0 and summary["after"] == summary["before"]


def test_advantages_are_zero_mean_per_group_and_param_groups_are_per_expert(root):
    scenario = get_scenario("t2i", rl_config(root, "t2i", "unused"))
    rewards = torch.tensor([0.1, 0.5, 0.9, 0.2, 0.3, 0.3, 0.3, 0.3])
    adv = scenario.advantages(rewards, 4)
    torch.testing.assert_close(adv.view(2, 4).mean(1), torch.zeros(2), atol=1e-6, rtol=0)
    g = rewards[:4]
    torch.testing.assert_close(adv[:4], (g - g.mean()) / (g.std() + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # identical rewards: no signal
    with pytest.raises(ValueError, match="unknown scenario 'paint'"):
        get_scenario("paint", rl_config(root, "t2i", "unused"))
    from unirl.models import UnifiedModel

    model = UnifiedModel.from_pretrained(root / "sft")
    groups = param_groups(model, "joint", lr_lm=1e-5, lr_dm=1e-3)
    assert [(g["name"], g["lr"]) for g in groups] == [("lm", 1e-5), ("dm", 1e-3)]
    lm_ids = {id(p) for _, p in model.parameter_groups()["lm"]}
    assert lm_ids <= {id(p) for p in groups[0]["params"]}
    assert isinstance(scenario, ScenarioBase)


@pytest.mark.parametrize("bad, message", [({"group_size": 1}, "group_size"), ({"inner_updates": 0}, "inner_updates"),
                                          ({"replay_chunk": -1}, "replay_chunk"), ({"eval_seeds": 0}, "eval_seeds")])
def test_train_rl_refuses_bad_settings_with_the_setting_named(root, bad, message):
    with pytest.raises(ValueError, match=message):
        train_rl(rl_config(root, "t2i", "bad", **bad))


def test_load_rl_config_applies_per_scenario_overrides(tmp_path):
    params = {"profile": "tiny",
              "rl": {"steps": 30, "lr_dm": 1e-4, "rewards": {"geneval": 1.0},
                     "engine": {"grad_clip": 1.0, "lr": 1e-4}},
              "rl_scenarios": {"t2i": {}, "edit": {"steps": 12, "rewards": {"edit_correctness": 1.0},
                                                  "engine": {"grad_clip": 0.5}}}}
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    t2i = load_rl_config("t2i", path)
    edit = load_rl_config("edit", path, overrides={"seed": 7, "engine.lr": 2e-4})
    assert (t2i.scenario, t2i.steps, t2i.rewards, t2i.engine.grad_clip) == ("t2i", 30, {"geneval": 1.0}, 1.0)
    assert (edit.scenario, edit.steps, edit.rewards, edit.seed) == ("edit", 12, {"edit_correctness": 1.0}, 7)
    assert (edit.engine.grad_clip, edit.engine.lr, edit.lr_dm) == (0.5, 2e-4, 1e-4)
    assert edit.resolved().out_dir == "data/models/rl_edit"
    assert edit.resolved().run_dir.startswith("data/runs/rl_edit/")  # one run directory per training config
    params["rl"]["stepz"] = 3
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(ValueError, match="stepz"):
        load_rl_config("t2i", path)


def _worker_cmd(root: Path, tag: str, *args: str) -> list[str]:
    return [sys.executable, str(WORKER), "--root", str(root), "--tag", tag, *args]


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the whole group (torchrun's workers included)."""
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{cmd[:4]}... timed out after {timeout}s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env() -> dict[str, str]:
    # Without the launcher variables an earlier in-process test may have set (its port may still be bound).
    base = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    return {**base, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(WORKER.parent), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_resume_after_a_kill_reproduces_the_uninterrupted_run(root):
    # with the weight average on: the checkpoints must carry it for the saved (averaged) model to match
    steps = ["--steps", "3", "--checkpoint-every", "1", "--ema-decay", "0.5"]
    full = train_rl(rl_config(root, "t2i", "full", steps=3, checkpoint_every=1, ema_decay=0.5))  # uninterrupted
    proc = subprocess.Popen(_worker_cmd(root, "killed", *steps), env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    run_dir = root / "killed" / "run"
    deadline = time.time() + 180
    while not (run_dir / "step-000001").is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (root / "killed" / "rank0.json").exists()
    resumed = _run(_worker_cmd(root, "killed", *steps), timeout=240)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed t2i from" in resumed.stdout
    b = json.loads((root / "killed" / "rank0.json").read_text())
    assert full["steps"] == b["steps"] == 3
    assert full["trainable_sha256"] == b["trainable_sha256"]
    from unirl.models import UnifiedModel

    assert param_digest(UnifiedModel.from_pretrained(root / "full" / "model").state_dict()) == b["saved_digest"]
    ra = list(csv.DictReader((root / "full" / "reports" / "reward_curve.csv").open()))
    rb = list(csv.DictReader((root / "killed" / "reports" / "reward_curve.csv").open()))
    assert [r["reward/mean"] for r in ra] == [r["reward/mean"] for r in rb]
    shutil.rmtree(root / "killed", ignore_errors=True)


def test_weight_average_is_what_the_run_evaluates_and_saves(root):
    """ema_decay d (no warm-up): after steps 1, 2 the saved trained weights are d^2 w0 + d(1-d) w1 + (1-d) w2 of
    the iterates, read from an identical run without the average; frozen weights stay the initial ones."""
    from unirl.train.checkpoint import load_checkpoint

    plain = train_rl(rl_config(root, "t2i", "iterates", steps=2, checkpoint_every=1, keep_checkpoints=2))
    avg = train_rl(rl_config(root, "t2i", "ema", steps=2, ema_decay=0.5))
    w0 = _weights(root / "sft")
    w1, w2 = (load_checkpoint(root / "iterates" / "run" / f"step-{s:06d}").model_state for s in (1, 2))
    saved = _weights(root / "ema" / "model")
    trained = [n for n in w0 if not torch.equal(w0[n], w2[n])]
    assert any(n.startswith("dit.") for n in trained) and not any(n.startswith("lm.") for n in trained)
    for n in w0:
        expect = 0.25 * w0[n] + 0.25 * w1[n] + 0.5 * w2[n] if n in trained else w0[n]
        torch.testing.assert_close(saved[n], expect, rtol=0, atol=1e-6)
    assert avg["trainable_sha256"] != plain["trainable_sha256"]  # the digest is of the saved (averaged) weights
    with pytest.raises(ValueError, match=r"rl.ema_decay must be in \[0, 1\)"):
        train_rl(rl_config(root, "t2i", "bad", ema_decay=1.0))


@pytest.mark.slow
def test_two_process_run_ranks_agree(root):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--master_addr",
           "127.0.0.1", "--master_port", str(port), str(WORKER), "--root", str(root), "--tag", "ddp", "--steps", "2"]
    proc = _run(cmd, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0 = json.loads((root / "ddp" / "rank0.json").read_text())
    r1 = json.loads((root / "ddp" / "rank1.json").read_text())
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["trainable_sha256"] == r1["trainable_sha256"]
    init = _weights(root / "sft")
    after = _weights(root / "ddp" / "model")
    assert _changed(init, after, "dit.")


@pytest.mark.slow
def test_deepspeed_backend_trains_the_same_parameters_as_plain_torch(root):
    proc = _run(_worker_cmd(root, "ds", "--steps", "2", "--backend", "deepspeed"), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ds = json.loads((root / "ds" / "rank0.json").read_text())
    plain = train_rl(rl_config(root, "t2i", "plain", steps=2))
    assert ds["steps"] == plain["steps"] == 2
    assert ds["trainable_sha256"] == plain["trainable_sha256"]  # ZeRO-2 on CPU, fp32: bit-identical updates


def test_evaluation_is_the_mean_over_eval_seeds_and_deterministic_scenarios_run_once(root):
    from unirl.models import UnifiedModel
    from unirl.rl.prompts import load_prompts
    from unirl.rl.trainer import evaluate_seeds

    model = UnifiedModel.from_pretrained(root / "sft").eval()
    cfg = rl_config(root, "t2i", "seeds", eval_seed=7, eval_seeds=3)
    scenario = get_scenario("t2i", cfg)
    prompts = load_prompts(root / "shards", "t2i", "test", limit=3)
    runs = [scenario.evaluate(model, prompts, 7 + k) for k in range(3)]
    got = evaluate_seeds(scenario, model, prompts, cfg)
    assert got == pytest.approx({**{k: sum(r[k] for r in runs) / 3 for k in runs[0]},
                                 "geneval_score/seed_std": float(torch.tensor(
                                     [r["geneval_score"] for r in runs], dtype=torch.float64).std())})
    # a deterministic scenario (understand: greedy decoding) is evaluated once, at eval_seed, without seed_std
    from unirl.rl.scenarios.understand import UnderstandScenario

    assert UnderstandScenario.eval_uses_seed is False and T2IScenario.eval_uses_seed is True
    calls = []
    scenario.eval_uses_seed = False
    evaluate = scenario.evaluate
    scenario.evaluate = lambda m, p, seed: calls.append(seed) or evaluate(m, p, seed)
    assert evaluate_seeds(scenario, model, prompts, cfg) == runs[0]
    assert calls == [7]


def test_eval_prompts_are_balanced_over_tags(root):
    import random
    from collections import Counter

    from unirl.rl.prompts import balanced, load_prompts, sample_prompts

    skewed = [{"tag": "common", "i": i} for i in range(90)] + [{"tag": t, "i": 0} for t in ("rare1", "rare2")]
    counts = Counter(p["tag"] for s in range(60) for p in sample_prompts(skewed, 3, random.Random(s)))
    assert counts == {"common": 60, "rare1": 60, "rare2": 60}  # every tag equally often, whatever its share
    drawn = sample_prompts(skewed, 5, random.Random(0))
    assert len({id(p) for p in drawn}) == 5  # distinct prompts even when tags repeat
    assert Counter(p["tag"] for p in sample_prompts(skewed, 3, random.Random(1), balance_tags=False))["common"] >= 1

    items = [{"tag": t, "i": i} for t in ("b", "a", "c") for i in range(3)]  # stored tag by tag, as shards are
    assert [(p["tag"], p["i"]) for p in balanced(items, 5)] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1)]
    assert len(balanced(items, 50)) == 9
    test = load_prompts(root / "shards", "t2i", "test", limit=4)
    assert len(test) == 4 and len({p["tag"] for p in test}) == min(4, len({p["tag"] for p in load_prompts(
        root / "shards", "t2i", "test")}))
    assert {"key", "images", "prompt", "metadata"} <= set(test[0])


def _mean_grey(images) -> float:
    import numpy as np

    return float(np.mean([np.asarray(im.convert("L"), dtype=np.float32).mean() / 255 for im in images]))


def test_grpo_moves_the_policy_in_the_direction_of_the_rewards_sign(root):
    """The engine optimises: with reward +grey level the ODE samples get brighter, with -grey level darker.

    A dense reward the policy can move (the verifier scores a random model 0 everywhere). Judged on the saved models'
    ODE samples at fixed seeds, so neither the training noise nor the rollout's SDE decides the comparison.
    """
    from unirl.models import UnifiedModel

    prompts = ["a picture of a circle", "two red squares", "a blue triangle", "a canvas with a square"] * 4

    def grey_of(path: Path) -> float:
        return _mean_grey(UnifiedModel.from_pretrained(path).generate_images(prompts, steps=3, seed=7))

    models = train_both_signs("test_grey", lambda im: _mean_grey([im]), lambda name: rl_config(
        root, "t2i", f"run_{name}", steps=8, prompts_per_step=2, group_size=4, eval_prompts=1, rewards={name: 1.0}))
    finals = {sign: grey_of(path) for sign, path in models.items()}
    start = grey_of(root / "sft")
    assert finals[1] > start + 0.02 and finals[-1] < start - 0.01, (start, finals)  # measured 0.42 -> 0.51 / 0.39
