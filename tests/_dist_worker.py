"""Training worker for the multi-process and kill/resume tests (run by torchrun or as a plain subprocess).

Trains :func:`toy_model` with :func:`unirl.train.build_engine` on per-(step, rank) data and writes
``<out>/rank{R}.json`` (a digest of every parameter, the step reached, the step resumed from) and, on rank 0,
``<out>/final.safetensors`` (the trained parameters). With ``--stochastic`` each step also draws from the global
torch, NumPy and Python RNGs (input noise, dropout, a loss scale), so an exact resume needs their saved states.
With ``--hang-after K`` the worker writes ``<out>/ready`` after saving the step-K checkpoint and then sleeps
until the test kills it; with ``--stop-after K`` it exits there.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from _worker_common import param_digest
from safetensors.torch import save_file
from torch import nn

from unirl.train import (
    EngineConfig,
    build_engine,
    load_checkpoint,
    resume_training,
    save_training_checkpoint,
    shutdown_distributed,
)

IN_DIM, HIDDEN, OUT_DIM, BATCH = 6, 16, 3, 4


class ToyModel(nn.Module):
    """Embedding (frozen) + MLP with LayerNorm and dropout; a persistent buffer; no tied weights."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.frozen_proj = nn.Linear(IN_DIM, IN_DIM)
        self.frozen_proj.requires_grad_(False)
        self.body = nn.Sequential(
            nn.Linear(IN_DIM, HIDDEN), nn.LayerNorm(HIDDEN), nn.GELU(), nn.Dropout(dropout), nn.Linear(HIDDEN, OUT_DIM)
        )
        self.head_bias = nn.Parameter(torch.zeros(OUT_DIM))
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.frozen_proj(x)) * self.scale + self.head_bias

    @torch.no_grad()
    def predict(self, model_input: list[list[float]], params: dict | None = None) -> list[list[float]]:
        """pyfunc-style inference: rows of IN_DIM floats -> rows of OUT_DIM floats (eval mode)."""
        self.eval()
        return self(torch.tensor(model_input, dtype=torch.float32)).tolist()


def load_toy_model(ckpt_dir: str | Path) -> ToyModel:
    """Loader for the MLflow pyfunc test: a checkpoint directory -> a ready ToyModel."""
    model = toy_model()
    model.load_state_dict(load_checkpoint(ckpt_dir).model_state)
    return model


def toy_model(seed: int = 0, dropout: float = 0.0) -> ToyModel:
    torch.manual_seed(seed)
    return ToyModel(dropout)


def toy_groups(model: ToyModel) -> list[dict]:
    """Two groups with different learning rates (like LM vs DM in the RL stage)."""
    return [
        {"params": list(model.body[0].parameters()) + list(model.body[1].parameters()), "lr": 3e-2, "name": "trunk"},
        {"params": list(model.body[4].parameters()) + [model.head_bias], "lr": 1e-2, "name": "head"},
    ]


def toy_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic data of (step, rank): different on every rank."""
    g = torch.Generator().manual_seed(10_000 + 100 * step + rank)
    x = torch.randn(BATCH, IN_DIM, generator=g)  # (B, IN_DIM)
    y = torch.randn(BATCH, OUT_DIM, generator=g)  # (B, OUT_DIM)
    return x, y


def toy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, stochastic: bool) -> torch.Tensor:
    if stochastic:  # global RNG draws, restored from the checkpoint on resume
        x = x + 0.1 * torch.randn_like(x)
        x = x * float(1.0 + 0.1 * np.random.rand()) * (1.0 + 0.1 * random.random())
    return (model(x) - y).pow(2).mean()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--ds-config", default="zero2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--stochastic", action="store_true")
    ap.add_argument("--out", required=True)
    ap.add_argument("--ckpt", default=None, help="run directory for checkpoints")
    ap.add_argument("--save-every", type=int, default=0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--hang-after", type=int, default=0)
    ap.add_argument("--stop-after", type=int, default=0, help="exit cleanly after the checkpoint of this step")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    np.random.seed(1234)
    random.seed(1234)

    model = toy_model(dropout=0.2 if args.stochastic else 0.0)
    cfg = EngineConfig(
        backend=args.backend,
        deepspeed_config=args.ds_config,
        grad_clip=1.0,
        warmup_steps=2,
        schedule="cosine",
        total_steps=args.steps,
        min_lr_ratio=0.1,
        grad_accum_steps=args.accum,
        micro_batch_size=BATCH,
    )
    engine = build_engine(model, toy_groups(model), cfg)
    rank = engine.info.rank
    start, resumed_from = 0, None
    if args.resume:
        ckpt = resume_training(engine, args.ckpt)
        if ckpt is not None:
            start = resumed_from = ckpt.step
    engine.module.train()
    for step in range(start, args.steps):
        for micro in range(args.accum):
            x, y = toy_batch(step * args.accum + micro, rank)
            engine.backward(toy_loss(engine.module, x, y, args.stochastic))
            engine.step()
        if args.save_every and (step + 1) % args.save_every == 0:
            save_training_checkpoint(engine, args.ckpt, step + 1, extra={"seed": 1234}, keep_last=2)
            if args.hang_after == step + 1:
                Path(args.out, "ready").write_text(str(step + 1))
                time.sleep(600)
            if args.stop_after == step + 1:
                shutdown_distributed()
                return
    out = Path(args.out)
    state = engine.model_state_dict()
    model_digest = param_digest(state)  # the gathered state: ZeRO-3 partitions the module's own parameters
    record = {
        "rank": rank,
        "world_size": engine.info.world_size,
        "digest": model_digest,
        "steps": args.steps,
        "resumed_from": resumed_from,
        "optimizer_step": engine.optimizer_step,
    }
    if rank == 0:
        save_file({k: v.cpu().contiguous() for k, v in state.items()}, str(out / "final.safetensors"))
    shutdown_distributed()
    record["group_left"] = not torch.distributed.is_initialized()
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    sys.exit(main())
