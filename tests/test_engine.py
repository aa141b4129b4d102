"""Engine: what gets trained, the schedule, torch vs DeepSpeed equivalence, 2-process data parallelism."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _dist_worker import BATCH, toy_batch, toy_groups, toy_loss, toy_model
from safetensors.torch import load_file

from unirl.config import PROJECT_ROOT
from unirl.train import EngineConfig, build_engine
from unirl.train.deepspeed_engine import load_deepspeed_config
from unirl.train.engine import lr_factor, torch_globals_restored

torch.set_num_threads(1)
WORKER = Path(__file__).with_name("_dist_worker.py")


def _train(engine, steps: int, accum: int = 1, rank: int = 0, stochastic: bool = False) -> list[float]:
    norms = []
    for step in range(steps):
        for micro in range(accum):
            x, y = toy_batch(step * accum + micro, rank)
            engine.backward(toy_loss(engine.module, x, y, stochastic))
            stepped = engine.step()
            assert stepped == (micro == accum - 1)
        norms.append(engine.grad_norm)
    return norms


def _cfg(**kw) -> EngineConfig:
    base = dict(grad_clip=1.0, warmup_steps=2, schedule="cosine", total_steps=5, min_lr_ratio=0.1)
    base.update(kw)
    return EngineConfig(**base)


def test_step_changes_exactly_the_trainable_parameters():
    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = build_engine(model, toy_groups(model), _cfg())
    in_optimizer = {id(p) for g in engine.optimizer.param_groups for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for n, p in model.named_parameters() if n in trainable} == in_optimizer
    assert not any(id(p) in in_optimizer for p in model.frozen_proj.parameters())
    _train(engine, 2)
    after = model.state_dict()
    for name in before:
        changed = not torch.equal(before[name], after[name])
        assert changed == (name in trainable), name  # frozen weights and the buffer stay bit-identical
    assert all(p.grad is None for p in model.parameters())  # zeroed after the step


def test_param_group_validation():
    model = toy_model()
    groups = toy_groups(model)
    with pytest.raises(ValueError, match="in no param group"):
        build_engine(model, groups[:1], _cfg())
    with pytest.raises(ValueError, match="is in groups 'trunk' and 'head'"):
        build_engine(
            model, [groups[0], {**groups[1], "params": groups[1]["params"] + groups[0]["params"][:1]}], _cfg()
        )
    with pytest.raises(ValueError, match="no trainable parameter"):
        build_engine(model, groups + [{"params": list(model.frozen_proj.parameters()), "name": "frozen"}], _cfg())
    with pytest.raises(ValueError, match="unknown key"):
        build_engine(model, [{**groups[0], "momentum": 0.9}, groups[1]], _cfg())
    with pytest.raises(ValueError, match="total_steps"):
        build_engine(model, groups, _cfg(total_steps=0))


def test_schedule_and_per_group_learning_rates():
    cfg = _cfg(warmup_steps=2, total_steps=6, min_lr_ratio=0.1)
    expected = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [lr_factor(cfg, t) for t in range(6)] == pytest.approx(expected)
    assert lr_factor(EngineConfig(warmup_steps=4), 10) == 1.0
    model = toy_model()
    engine = build_engine(model, toy_groups(model), cfg)
    seen = []
    for step in range(6):
        x, y = toy_batch(step, 0)
        engine.backward(toy_loss(model, x, y, False))
        engine.step()
        seen.append(engine.lr())
        assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx(list(seen[-1].values()))
    assert [s["trunk"] for s in seen] == pytest.approx([3e-2 * f for f in expected])
    assert [s["head"] for s in seen] == pytest.approx([1e-2 * f for f in expected])


def test_grad_accumulation_equals_one_big_batch():
    """2 micro-batches of B accumulated == one batch of 2B (mean loss), same clipping, same step."""
    a, b = toy_model(), toy_model()
    ea = build_engine(a, toy_groups(a), _cfg(grad_accum_steps=2))
    eb = build_engine(b, toy_groups(b), _cfg())
    _train(ea, 3, accum=2)
    for step in range(3):
        xs, ys = zip(*(toy_batch(step * 2 + m, 0) for m in range(2)))
        eb.backward(toy_loss(b, torch.cat(xs), torch.cat(ys), False))
        eb.step()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)


@pytest.mark.slow
@pytest.mark.parametrize("ds_config", ["zero2", "zero3"])
def test_deepspeed_matches_torch_backend(ds_config):
    """Same seed, data, groups, clipping, accumulation and schedule: parameters agree to 1e-6 after 5 steps.

    Not bit-exact: DeepSpeed flattens the gradients into one fp32 buffer and sums the clipping norm in another
    order, which moves the last bits (observed max difference ~3e-8).
    """
    ref = toy_model()
    ref_engine = build_engine(ref, toy_groups(ref), _cfg(grad_accum_steps=2))
    ref_norms = _train(ref_engine, 5, accum=2)
    model = toy_model()
    linear = torch.nn.functional.linear
    with torch_globals_restored():
        engine = build_engine(
            model, toy_groups(model), _cfg(backend="deepspeed", deepspeed_config=ds_config, grad_accum_steps=2)
        )
        assert type(engine).__name__ == "DeepSpeedEngine" and engine.zero_stage == int(ds_config[-1])
        norms = _train(engine, 5, accum=2)
        patched = torch.nn.functional.linear is not linear
    assert patched == (ds_config == "zero3")  # ZeRO-3 swaps F.linear for its own; the block puts torch's back
    assert torch.nn.functional.linear is linear
    assert norms == pytest.approx(ref_norms, rel=1e-5)
    assert engine.lr() == pytest.approx(ref_engine.lr())
    state, ref_state = engine.model_state_dict(), ref_engine.model_state_dict()
    assert state.keys() == ref_state.keys()
    for k in ref_state:
        torch.testing.assert_close(state[k].cpu(), ref_state[k], rtol=0, atol=1e-6, msg=k)
    frozen = toy_model().frozen_proj.state_dict()
    assert torch.equal(state["frozen_proj.weight"].cpu(), frozen["weight"])
    opt, ref_opt = engine.state_dict_for_checkpoint(), ref_engine.state_dict_for_checkpoint()
    for k in ref_opt["exp_avg"]:
        torch.testing.assert_close(opt["exp_avg"][k].cpu(), ref_opt["exp_avg"][k], rtol=0, atol=1e-6)


def test_deepspeed_config_overrides():
    cfg = EngineConfig(
        backend="deepspeed",
        deepspeed_config="zero2",
        lr=3e-4,
        grad_clip=0.5,
        micro_batch_size=4,
        grad_accum_steps=2,
        precision="bf16",
    )
    ds = load_deepspeed_config(cfg, world_size=2)
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 2 and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["lr"] == 3e-4
    assert ds["bf16"]["enabled"] is True
    for stage in (1, 2, 3):
        on_disk = json.loads((PROJECT_ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
        assert on_disk["zero_optimization"]["stage"] == stage
    with pytest.raises(FileNotFoundError, match="zero9"):
        load_deepspeed_config(EngineConfig(deepspeed_config="zero9"), 1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(tmp_path: Path, *args: str) -> list[dict]:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        str(WORKER),
        "--out",
        str(tmp_path),
        *args,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank*.json"))]


@pytest.mark.slow
@pytest.mark.parametrize(("backend", "resume"), [("torch", False), ("deepspeed", False), ("torch", True)])
def test_two_processes_end_identical_and_equal_the_averaged_gradient(tmp_path, backend, resume):
    """torchrun, 2 CPU processes (gloo), different data per rank, 3 steps of 2 accumulated micro-batches.

    Both ranks end with bit-identical parameters, and those equal one process training on both ranks' data
    (mean over 2B samples) to 1e-6: gradients were averaged, not just kept in sync. With ``resume`` the job
    stops after its step-1 checkpoint (written collectively, rank 0 only) and a second torchrun job resumes it.
    """
    steps, accum = 3, 2
    args = ["--backend", backend, "--ds-config", "zero2", "--steps", str(steps), "--accum", str(accum)]
    if resume:
        ckpt = ["--ckpt", str(tmp_path / "ckpt"), "--save-every", "1"]
        _torchrun(tmp_path / "first", *args, *ckpt, "--stop-after", "1")
        assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["step-000001"]
        args += [*ckpt, "--resume"]
    records = _torchrun(tmp_path, *args)
    assert [r["resumed_from"] for r in records] == ([1, 1] if resume else [None, None])
    assert [r["world_size"] for r in records] == [2, 2]
    assert all(r["group_left"] for r in records)  # shutdown_distributed left the group before exit
    assert records[0]["digest"] == records[1]["digest"]
    assert records[0]["optimizer_step"] == steps
    final = load_file(str(tmp_path / "final.safetensors"))

    ref = toy_model()
    engine = build_engine(
        ref,
        toy_groups(ref),
        _cfg(schedule="cosine", total_steps=steps, grad_accum_steps=accum, micro_batch_size=BATCH),
    )
    for step in range(steps):
        for micro in range(accum):
            xs, ys = zip(*(toy_batch(step * accum + micro, rank) for rank in range(2)))
            engine.backward(toy_loss(ref, torch.cat(xs), torch.cat(ys), False))
            engine.step()
    init = toy_model().state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(final[k], v, rtol=0, atol=1e-6, msg=k)
        if k.startswith("body"):
            assert not torch.equal(final[k], init[k]), k


def test_checkpoint_state_only_on_accumulation_boundary():
    model = toy_model()
    engine = build_engine(model, toy_groups(model), _cfg(grad_accum_steps=2))
    x, y = toy_batch(0, 0)
    engine.backward(toy_loss(model, x, y, False))
    assert engine.step() is False
    with pytest.raises(RuntimeError, match="after micro-batch 1 of 2: save right after a step"):
        engine.state_dict_for_checkpoint()


_INIT_SCRIPT = """
import json, os, torch.distributed as dist
from unirl.train.distributed import init_distributed, rank0_print
alone = init_distributed()
assert not dist.is_initialized()
grouped = init_distributed(require_group=True)
rank0_print(json.dumps({"alone": alone.__dict__, "grouped": grouped.__dict__, "world": dist.get_world_size(),
                        "backend": dist.get_backend(), "port": os.environ["MASTER_PORT"]}))
dist.destroy_process_group()
"""


def test_init_distributed_as_a_plain_process():
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    out = subprocess.run([sys.executable, "-c", _INIT_SCRIPT], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    info = json.loads(out.stdout.strip().splitlines()[-1])
    single = {"rank": 0, "local_rank": 0, "world_size": 1, "is_main": True}
    assert info["alone"] == single and info["grouped"] == single
    assert info["world"] == 1 and info["backend"] == "gloo" and int(info["port"]) > 0
