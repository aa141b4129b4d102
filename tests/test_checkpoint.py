"""Checkpoints: round trip, RNG, atomic writes and pruning, clear errors, and kill -9 + resume == straight run."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _dist_worker import toy_batch, toy_groups, toy_loss, toy_model
from safetensors.torch import load_file
from torch import nn

from unirl.train import EngineConfig, build_engine
from unirl.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    inputs_digest,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    resume_training,
    save_checkpoint,
    save_training_checkpoint,
)

torch.set_num_threads(1)
WORKER = Path(__file__).with_name("_dist_worker.py")
CFG = dict(grad_clip=1.0, warmup_steps=2, schedule="cosine", total_steps=6, min_lr_ratio=0.1)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.lm_head = nn.Linear(3, 5, bias=False)
        self.lm_head.weight = self.embed.weight
        self.register_buffer("counter", torch.arange(4, dtype=torch.int64))


def _draws() -> tuple:
    return torch.rand(3), np.random.rand(3), random.random(), np.random.randn()


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    state = capture_rng_state()
    first = _draws()
    restore_rng_state(state)
    second = _draws()
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_round_trip_model_engine_rng(tmp_path):
    model = Tied()
    engine_state = {
        "format": "x",
        "step": 3,
        "lrs": [1e-3, 2e-4],
        "nested": {"a.b": torch.randn(2, 3), "none": None},
        "ints": torch.arange(5, dtype=torch.int32),
        "bf16": torch.ones(2, dtype=torch.bfloat16),
    }
    rng = capture_rng_state()
    path = save_checkpoint(tmp_path, 3, model.state_dict(), engine_state, rng, extra={"seed": 7, "data": "abc"})
    assert path == tmp_path / "step-000003" and sorted(p.name for p in path.iterdir()) == [
        "checkpoint.json",
        "model.safetensors",
        "trainer_state.safetensors",
    ]
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))  # tied weight stored once

    ckpt = load_checkpoint(tmp_path)  # a run dir resolves to its newest checkpoint
    assert ckpt.step == 3 and ckpt.extra == {"seed": 7, "data": "abc"} and ckpt.path == path
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model_state[k], v) and ckpt.model_state[k].dtype == v.dtype
    fresh = Tied()
    fresh.load_state_dict(ckpt.model_state)
    assert fresh.lm_head.weight is fresh.embed.weight and torch.equal(fresh.embed.weight, model.embed.weight)
    e = ckpt.engine_state
    assert e["format"] == "x" and e["step"] == 3 and e["lrs"] == [1e-3, 2e-4] and e["nested"]["none"] is None
    for key in ("ints", "bf16"):
        assert torch.equal(e[key], engine_state[key]) and e[key].dtype == engine_state[key].dtype
    assert torch.equal(e["nested"]["a.b"], engine_state["nested"]["a.b"])
    assert torch.equal(ckpt.rng_state["torch"], rng["torch"]) and ckpt.rng_state["python"] == rng["python"]


def test_atomic_write_latest_and_keep_last(tmp_path):
    state = {"w": torch.zeros(2)}
    stale = tmp_path / "step-000009.tmp"  # what a process killed mid-write leaves behind
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) is None
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, state, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000004"]
    assert latest_checkpoint(tmp_path).name == "step-000004" and not stale.exists()
    save_checkpoint(tmp_path, 4, {"w": torch.ones(2)})  # re-saving a step replaces it
    assert torch.equal(load_checkpoint(tmp_path / "step-000004").model_state["w"], torch.ones(2))
    with pytest.raises(TypeError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 5, state, extra={"bad": object()})
    with pytest.raises(TypeError, match="cannot store"):
        save_checkpoint(tmp_path, 5, state, engine_state={"bad": object()})


def test_missing_incomplete_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match=f"no checkpoint at {tmp_path / 'nope'}"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "step-000002.tmp").mkdir()
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(tmp_path / "step-000002.tmp")

    path = save_checkpoint(tmp_path / "run", 1, {"w": torch.arange(1000.0)}, {"m": torch.ones(3)})
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # flip bits inside the tensor data: still parses, wrong content
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt \(sha256.*delete .*step-000001"):
        load_checkpoint(path)
    weights.write_bytes(bytes(data[:20]))  # truncated
    with pytest.raises(CheckpointError, match="model.safetensors is not a readable safetensors file"):
        load_checkpoint(path, verify=False)
    (path / "trainer_state.safetensors").unlink()
    with pytest.raises(CheckpointError, match="trainer_state.safetensors is missing"):
        load_checkpoint(path)
    (path / "checkpoint.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json is unreadable"):
        load_checkpoint(path)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def _engine(**kw):
    model = toy_model(dropout=0.2)
    return build_engine(model, toy_groups(model), EngineConfig(**{**CFG, **kw}))


def _run(engine, start: int, stop: int) -> None:
    engine.module.train()
    for step in range(start, stop):
        x, y = toy_batch(step, 0)
        engine.backward(toy_loss(engine.module, x, y, stochastic=True))
        engine.step()


def test_in_process_resume_is_exact_and_key_mismatch_is_named(tmp_path):
    _seed_all(0)
    straight = _engine()
    _run(straight, 0, 6)

    _seed_all(0)
    first = _engine()
    _run(first, 0, 3)
    save_training_checkpoint(first, tmp_path, 3, extra={"seed": 0})
    second = _engine()
    _seed_all(99)  # different RNG and fresh weights: everything must come from the checkpoint
    ckpt = resume_training(second, tmp_path)
    assert ckpt.step == 3 and second.optimizer_step == 3 and second.lr() == pytest.approx(first.lr())
    _run(second, 3, 6)
    for (n, p), q in zip(straight.module.named_parameters(), second.module.parameters()):
        assert torch.equal(p, q), n

    assert resume_training(_engine(), tmp_path / "fresh-run") is None  # nothing to resume: fresh start
    other = nn.Sequential(nn.Linear(6, 3))
    eng = build_engine(other, [{"params": list(other.parameters()), "name": "trunk"}], EngineConfig())
    with pytest.raises(
        CheckpointError,
        match=r"model state in .*step-000003 does not match: 2 missing key\(s\) \['0.bias', '0.weight'\], 10 unex",
    ):
        resume_training(eng, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_deepspeed_resumes_a_torch_checkpoint(tmp_path, ds_config):
    """Checkpoints are engine-independent: torch 3 steps -> DeepSpeed 3 more == torch 6 steps (1e-6), and back."""
    _seed_all(0)
    straight = _engine()
    _run(straight, 0, 6)
    _seed_all(0)
    first = _engine()
    _run(first, 0, 3)
    save_training_checkpoint(first, tmp_path, 3)
    ds = _engine(backend="deepspeed", deepspeed_config=ds_config)
    assert resume_training(ds, tmp_path).step == 3
    _run(ds, 3, 6)
    ds_state = ds.model_state_dict()  # ZeRO-3 partitions module parameters: compare the gathered state
    for k, v in straight.model_state_dict().items():
        torch.testing.assert_close(ds_state[k], v, rtol=0, atol=1e-6, msg=k)
    save_training_checkpoint(ds, tmp_path, 6)
    back = _engine()  # and the DeepSpeed checkpoint loads into the torch engine
    resume_training(back, tmp_path)
    for k, v in back.model_state_dict().items():
        assert torch.equal(ds_state[k], v), k


def _worker(out: Path, ckpt: Path, *args: str) -> subprocess.Popen:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(WORKER), "--steps", "6", "--stochastic", "--out", str(out), "--ckpt", str(ckpt), *args]
    return subprocess.Popen(
        cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.mark.slow
def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    """SIGKILL a training process after its step-3 checkpoint, resume to step 6: bit-identical to 6 straight steps.

    The worker draws input noise, dropout masks and loss scales from the global torch/NumPy/Python RNGs, so this
    holds only because the checkpoint restores their states (exact on CPU: same ops, same order, same seeds).
    """
    straight = _worker(tmp_path / "straight", tmp_path / "ck_straight")
    victim = _worker(tmp_path / "killed", tmp_path / "ck", "--save-every", "3", "--hang-after", "3")
    deadline = time.monotonic() + 90
    while not (tmp_path / "killed" / "ready").exists():
        assert victim.poll() is None, victim.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "worker never wrote its step-3 checkpoint"
        time.sleep(0.1)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=30) == -signal.SIGKILL
    assert latest_checkpoint(tmp_path / "ck").name == "step-000003"
    assert not (tmp_path / "killed" / "rank0.json").exists()

    resumed = _worker(tmp_path / "resumed", tmp_path / "ck", "--save-every", "3", "--resume")
    for proc in (straight, resumed):
        assert proc.wait(timeout=90) == 0, proc.stdout.read()[-3000:]
    a = json.loads((tmp_path / "straight" / "rank0.json").read_text())
    b = json.loads((tmp_path / "resumed" / "rank0.json").read_text())
    assert a["resumed_from"] is None and b["resumed_from"] == 3 and b["optimizer_step"] == 6
    assert a["digest"] == b["digest"]
    fa, fb = (load_file(str(tmp_path / d / "final.safetensors")) for d in ("straight", "resumed"))
    init = toy_model().state_dict()
    for k in fa:
        assert torch.equal(fa[k], fb[k]), k
    assert not torch.equal(fa["body.0.weight"], init["body.0.weight"])
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["step-000003", "step-000006"]


def test_inputs_digest_follows_contents_not_paths_or_times(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "x.bin").write_bytes(b"\x00\x01")
        (d / "y.json").write_text("{}")
    assert inputs_digest([a]) == inputs_digest([b])  # same contents elsewhere: same runs
    os.utime(b / "y.json", (1, 1))
    assert inputs_digest([a]) == inputs_digest([b])
    (b / "sub" / "x.bin").write_bytes(b"\x00\x02")
    assert inputs_digest([a]) != inputs_digest([b])  # new data: a fresh run
    (b / "sub" / "x.bin").write_bytes(b"\x00\x01")
    (b / "z").write_text("")
    assert inputs_digest([a]) != inputs_digest([b])  # an added file counts
    assert inputs_digest([a, tmp_path / "nope"]) != inputs_digest([a])  # a missing input is part of the identity
    assert inputs_digest([a / "y.json"]) == inputs_digest([b / "y.json"])  # single files too


def test_default_run_dirs_move_with_the_input_data(tmp_path: Path) -> None:
    from unirl.rl.trainer import RLConfig
    from unirl.train.sft import SFTConfig, resolve_run_dir

    dirs = {n: tmp_path / n for n in ("shards", "tok", "vae", "init")}
    for d in dirs.values():
        d.mkdir()
        (d / "f").write_text("v1")
    sft = SFTConfig(shards_dir=str(dirs["shards"]), tokenizer_dir=str(dirs["tok"]), vae_dir=str(dirs["vae"]))
    rl = RLConfig(init_dir=str(dirs["init"]), shards_dir=str(dirs["shards"]))
    before = resolve_run_dir(sft).run_dir, rl.resolved().run_dir
    assert before == (resolve_run_dir(sft).run_dir, rl.resolved().run_dir)  # same settings + data: resume
    (dirs["vae"] / "f").write_text("v2")  # a retrained autoencoder: SFT starts afresh, RL (same init) does not
    assert resolve_run_dir(sft).run_dir != before[0] and rl.resolved().run_dir == before[1]
    (dirs["init"] / "f").write_text("v2")  # a new SFT model: RL starts afresh
    assert rl.resolved().run_dir != before[1]
    assert resolve_run_dir(dataclasses.replace(sft, run_dir="mine")).run_dir == "mine"  # explicit: kept
