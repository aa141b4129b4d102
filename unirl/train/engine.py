"""Training engine: one interface over plain PyTorch and DeepSpeed, selected by ``EngineConfig.backend``.

What it implements, for both backends alike:

* **Optimiser**: AdamW (``torch.optim.AdamW``; under DeepSpeed through ``"torch_adam": true`` so no fused-op
  build) over named parameter groups, each with its own learning rate (the RL stage gives the LM and the DM
  different rates). Frozen parameters never enter the optimiser, and every trainable parameter of the module
  must be in exactly one group (an error otherwise), so ``requires_grad`` *is* the set of trained weights.
* **Schedule**: linear warmup over ``warmup_steps`` optimiser steps (factor ``(t+1)/warmup_steps``), then
  constant or cosine decay to ``min_lr_ratio`` at ``total_steps``; applied by the engine to every group's
  base rate, so it is identical under both backends and its only state is the step counter.
* **Step**: ``backward(loss)`` accumulates ``loss / grad_accum_steps``; ``step()`` is called after every
  micro-batch and acts on the accumulation boundary only: average gradients over ranks, clip the global norm
  to ``grad_clip``, AdamW step, zero the gradients. A trainable parameter that got no gradient this step is
  treated as having a zero gradient (its moments still decay and weight decay still applies): that is what
  DeepSpeed's flat ZeRO buffers do, and doing the same in the torch backend keeps the two identical.
* **Data parallel, torch backend**: parameters are broadcast from rank 0 at build time and gradients are
  averaged with one flat ``all_reduce`` at the boundary. This is DDP's arithmetic without its wrapper: DDP
  only synchronises gradients that flow through ``DDP.forward``, while the unified model's losses call its
  submodules (LM, connector, DiT) directly and leave some of them unused per batch (e.g. the ``i2i`` queries
  on a text-to-image batch).
* **DeepSpeed backend** (:mod:`unirl.train.deepspeed_engine`): ``deepspeed.initialize`` with a ZeRO config from
  ``configs/deepspeed/`` overridden by this config (learning rate, AdamW hyper-parameters, clipping, batch sizes,
  bf16). On CPU: ``DS_ACCELERATOR=cpu`` + gloo (see :mod:`unirl.train.distributed`).
* **Checkpoint state** is engine-independent: the full model state (ZeRO-3 parameters gathered) and, per
  trainable parameter *name*, AdamW's ``exp_avg``/``exp_avg_sq`` in the parameter's own shape, plus the step
  counters. A checkpoint written by one backend resumes under the other.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from unirl.config import option
from unirl.train.checkpoint import CheckpointError, check_key_sets
from unirl.train.distributed import DistInfo, configure_deepspeed_env, default_device, init_distributed

__all__ = ["Engine", "EngineConfig", "build_engine", "lr_factor", "torch_globals_restored"]

ENGINE_STATE_FORMAT = "unirl.engine/adamw-v1"
_GROUP_KEYS = {"params", "lr", "name", "weight_decay"}


@dataclass
class EngineConfig:
    """Optimiser, schedule and parallelism of one training stage (section ``engine`` of a stage config)."""

    # --- backend ---
    backend: str = option("torch", "'torch' (AdamW, gradients averaged over ranks) or 'deepspeed' (ZeRO)")
    deepspeed_config: str = option(
        "zero2", "DeepSpeed JSON: a name in configs/deepspeed/ (zero1, zero2, zero3) or a path to a .json file"
    )
    precision: str = option("fp32", "'fp32' or 'bf16' (DeepSpeed: bf16 weights + fp32 master; torch: autocast)")
    # --- optimiser ---
    lr: float = option(1e-4, "learning rate of parameter groups that do not set their own 'lr'")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay of groups that do not set their own")
    betas: list = option([0.9, 0.999], "AdamW (beta1, beta2)")
    eps: float = option(1e-8, "AdamW epsilon")
    grad_clip: float = option(1.0, "clip the global gradient L2 norm to this value before each step (0 = off)")
    # --- schedule ---
    schedule: str = option("constant", "learning-rate shape after warmup: 'constant' or 'cosine'")
    warmup_steps: int = option(0, "linear warmup length in optimiser steps (factor (t+1)/warmup_steps)")
    total_steps: int = option(0, "optimiser steps of the whole run (needed by 'cosine')")
    min_lr_ratio: float = option(0.0, "cosine floor as a fraction of each group's base learning rate")
    # --- batching ---
    micro_batch_size: int = option(1, "samples per process per micro-batch (DeepSpeed batch bookkeeping)")
    grad_accum_steps: int = option(1, "micro-batches accumulated into one optimiser step")


def lr_factor(cfg: EngineConfig, step: int) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.total_steps - cfg.warmup_steps)
        progress = min(1.0, max(0.0, (step - cfg.warmup_steps) / span))
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown engine.schedule {cfg.schedule!r}: use 'constant' or 'cosine'")


def _validate(cfg: EngineConfig) -> None:
    if cfg.backend not in ("torch", "deepspeed"):
        raise ValueError(f"unknown engine.backend {cfg.backend!r}: use 'torch' or 'deepspeed'")
    if cfg.precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown engine.precision {cfg.precision!r}: use 'fp32' or 'bf16'")
    if cfg.schedule == "cosine" and cfg.total_steps <= cfg.warmup_steps:
        raise ValueError("engine.schedule 'cosine' needs engine.total_steps > engine.warmup_steps")
    if cfg.grad_accum_steps < 1 or cfg.micro_batch_size < 1:
        raise ValueError("engine.grad_accum_steps and engine.micro_batch_size must be >= 1")
    lr_factor(cfg, 0)


def _named_groups(model: nn.Module, param_groups: list[dict], cfg: EngineConfig) -> list[dict]:
    """Check the groups against the model; return them with names, base lr and frozen params removed."""
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    groups = []
    for i, g in enumerate(param_groups):
        unknown = set(g) - _GROUP_KEYS
        if unknown:
            raise ValueError(f"param group {i} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_GROUP_KEYS)}")
        gname = str(g.get("name", f"group{i}"))
        params = []
        for p in g["params"]:
            if id(p) not in names:
                raise ValueError(f"param group {gname!r} holds a tensor that is not a parameter of the model")
            if id(p) in seen:
                raise ValueError(f"parameter {names[id(p)]!r} is in groups {seen[id(p)]!r} and {gname!r}")
            seen[id(p)] = gname
            if p.requires_grad:
                params.append(p)
        if not params:
            raise ValueError(f"param group {gname!r} has no trainable parameter (all frozen or empty)")
        groups.append(
            {
                "params": params,
                "name": gname,
                "lr": float(g.get("lr", cfg.lr)),
                "weight_decay": float(g.get("weight_decay", cfg.weight_decay)),
            }
        )
    if len({g["name"] for g in groups}) != len(groups):
        raise ValueError(f"param group names must be unique, got {[g['name'] for g in groups]}")
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(
            f"{len(missing)} trainable parameter(s) are in no param group, e.g. {missing[:3]}: "
            "freeze them (requires_grad_(False)) or add them to a group"
        )
    return groups


class Engine:
    """Backend-independent training engine; build it with :func:`build_engine`.

    Per micro-batch: ``engine.backward(loss)`` then ``engine.step()`` (True when an optimiser step ran).
    Attributes: ``optimizer_step`` (optimiser steps taken), ``micro_step``, ``grad_norm`` (global L2 norm of the
    averaged gradient before clipping, at the last optimiser step), ``info`` (:class:`DistInfo`),
    ``trainable`` ([(name, parameter)] in group order), ``group_names``, ``base_lrs``.
    """

    def __init__(self, module: nn.Module, groups: list[dict], cfg: EngineConfig, info: DistInfo) -> None:
        self.cfg = cfg
        self.info = info
        self._module = module
        self.group_names: list[str] = [g["name"] for g in groups]
        self.base_lrs: list[float] = [g["lr"] for g in groups]
        names = {id(p): n for n, p in module.named_parameters()}
        self.group_params: list[list[str]] = [[names[id(p)] for p in g["params"]] for g in groups]
        self.trainable: list[tuple[str, nn.Parameter]] = [(names[id(p)], p) for g in groups for p in g["params"]]
        self._shapes = {n: tuple(p.shape) for n, p in self.trainable}  # before ZeRO-3 partitions them
        self.optimizer_step = 0
        self.micro_step = 0
        self.grad_norm: float | None = None

    # --- interface ---
    @property
    def module(self) -> nn.Module:
        """The trained ``nn.Module`` itself (not a wrapper): call its methods directly."""
        return self._module

    @property
    def device(self) -> torch.device:
        return default_device(self.info)

    @property
    def is_main(self) -> bool:
        return self.info.is_main

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context for forward passes: bf16 autocast with ``precision='bf16'`` (a no-op for fp32).

        Torch backend: fp32 weights, bf16 matmuls. DeepSpeed: the module itself is bf16 and autocast casts the
        fp32 inputs the loop feeds it.
        """
        if self.cfg.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lr(self) -> dict[str, float]:
        """Learning rate of each group (by name) used by the latest optimiser step (before any: the first)."""
        return self._lrs_at(max(0, self.optimizer_step - 1))

    def _lrs_at(self, step: int) -> dict[str, float]:
        f = lr_factor(self.cfg, step)
        return {n: base * f for n, base in zip(self.group_names, self.base_lrs)}

    def is_boundary(self) -> bool:
        """Whether the next ``step()`` call performs an optimiser step."""
        return (self.micro_step + 1) % self.cfg.grad_accum_steps == 0

    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> bool:
        """End one micro-batch; on the accumulation boundary clip, step, schedule and zero grads (returns True)."""
        raise NotImplementedError

    def _apply_lr(self, optim_groups: list[dict]) -> None:
        lrs = self._lrs_at(self.optimizer_step)
        for g in optim_groups:
            g["lr"] = lrs[g["name"]]

    # --- checkpoint state ---
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        """Full model state (fp32 master values for trainable weights). Collective: call on every rank."""
        raise NotImplementedError

    def _moments(self) -> dict[str, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def _set_moments(self, moments: dict[str, dict[str, torch.Tensor]]) -> None:
        raise NotImplementedError

    def _set_model_state(self, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    def state_dict_for_checkpoint(self) -> dict[str, Any]:
        """Engine-independent optimiser state (nested dict of tensors/scalars). Collective: call on every rank.

        Only valid on an accumulation boundary (after a ``step()`` that returned True): a partial accumulation
        lives in ``.grad`` and is not saved.
        """
        if self.micro_step % self.cfg.grad_accum_steps:
            raise RuntimeError(
                f"checkpoint requested after micro-batch {self.micro_step % self.cfg.grad_accum_steps} of "
                f"{self.cfg.grad_accum_steps}: save right after a step() that returned True"
            )
        moments = self._moments()
        return {
            "format": ENGINE_STATE_FORMAT,
            "backend": self.cfg.backend,
            "optimizer_step": self.optimizer_step,
            "micro_step": self.micro_step,
            "groups": [
                {"name": n, "base_lr": lr, "params": ps}
                for n, lr, ps in zip(self.group_names, self.base_lrs, self.group_params)
            ],
            "exp_avg": {n: m["exp_avg"] for n, m in moments.items()},
            "exp_avg_sq": {n: m["exp_avg_sq"] for n, m in moments.items()},
        }

    def load_checkpoint_state(
        self,
        engine_state: dict[str, Any] | None,
        model_state: dict[str, torch.Tensor] | None = None,
        source: str | Path | None = None,
    ) -> None:
        """Restore the model weights (if given) and the optimiser state of :meth:`state_dict_for_checkpoint`.

        Call on every rank after building the engine. Raises :class:`CheckpointError` (naming ``source``, the
        checkpoint path) when the checkpoint's parameter names or groups do not match this engine's.
        """
        where = f" of {source}" if source is not None else ""
        if model_state is not None:
            check_key_sets(self._module.state_dict().keys(), model_state.keys(), "model state", source)
            self._set_model_state(model_state)
        if engine_state is None:
            return
        if engine_state.get("format") != ENGINE_STATE_FORMAT:
            raise CheckpointError(
                f"engine state{where} has format {engine_state.get('format')!r}, "
                f"expected {ENGINE_STATE_FORMAT!r}: it was not written by this engine"
            )
        names = [g["name"] for g in engine_state["groups"]]
        if names != self.group_names:
            raise CheckpointError(
                f"param groups{where} {names} differ from this run's {self.group_names}: "
                "build the engine with the same groups to resume"
            )
        check_key_sets([n for n, _ in self.trainable], engine_state["exp_avg"].keys(), "optimizer state", source)
        self.optimizer_step = int(engine_state["optimizer_step"])
        self.micro_step = int(engine_state["micro_step"])
        self._set_moments(
            {
                n: {"exp_avg": engine_state["exp_avg"][n], "exp_avg_sq": engine_state["exp_avg_sq"][n]}
                for n, _ in self.trainable
            }
        )


class TorchEngine(Engine):
    """Plain PyTorch AdamW; gradients averaged over ranks by one flat ``all_reduce`` (see the module docstring)."""

    def __init__(self, module: nn.Module, groups: list[dict], cfg: EngineConfig, info: DistInfo) -> None:
        super().__init__(module, groups, cfg, info)
        self.optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay
        )
        if info.world_size > 1:
            with torch.no_grad():
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t.data, src=0)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.cfg.grad_accum_steps).backward()

    def _all_reduce_grads(self) -> None:
        params = [p for _, p in self.trainable]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.info.world_size == 1:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in params])  # (N_trainable,)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.info.world_size
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def step(self) -> bool:
        boundary = self.is_boundary()
        self.micro_step += 1
        if not boundary:
            return False
        self._all_reduce_grads()
        params = [p for _, p in self.trainable]
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self._apply_lr(self.optimizer.param_groups)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer_step += 1
        return True

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self._module.state_dict().items()}

    def _set_model_state(self, state: dict[str, torch.Tensor]) -> None:
        self._module.load_state_dict(state, strict=True)

    def _moments(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for n, p in self.trainable:
            st = self.optimizer.state.get(p, {})
            out[n] = {k: st[k].detach() if k in st else torch.zeros_like(p) for k in ("exp_avg", "exp_avg_sq")}
        return out

    def _set_moments(self, moments: dict[str, dict[str, torch.Tensor]]) -> None:
        for n, p in self.trainable:
            self.optimizer.state[p] = {
                "step": torch.tensor(float(self.optimizer_step)),
                "exp_avg": moments[n]["exp_avg"].to(p.device, p.dtype).clone().view_as(p),
                "exp_avg_sq": moments[n]["exp_avg_sq"].to(p.device, p.dtype).clone().view_as(p),
            }


def build_engine(model: nn.Module, param_groups: list[dict], cfg: EngineConfig) -> Engine:
    """Wrap ``model`` for training with the optimiser/schedule/backend of ``cfg``.

    Args:
        model: the module to train, already on its device (``default_device()``); its frozen parameters
            (``requires_grad=False``) are left out of the optimiser.
        param_groups: ``[{"params": [...], "lr": float, "name": str, "weight_decay": float (optional)}]``;
            every trainable parameter must be in exactly one group.
        cfg: the :class:`EngineConfig`.

    Joins the process group from the launcher's environment first (:func:`init_distributed`).
    """
    _validate(cfg)
    groups = _named_groups(model, param_groups, cfg)
    if cfg.backend == "deepspeed":
        configure_deepspeed_env()
        info = init_distributed(require_group=True)
        from unirl.train.deepspeed_engine import DeepSpeedEngine

        return DeepSpeedEngine(model, groups, cfg, info)
    info = init_distributed()
    return TorchEngine(model, groups, cfg, info)


@contextlib.contextmanager
def torch_globals_restored() -> Iterator[None]:
    """Put back, when the block ends, what a DeepSpeed ZeRO-3 engine patches into torch for the rest of the process
    (``torch.nn.functional.linear``, ``torch.manual_seed``). Wrap each stage of a multi-stage process in it
    (``unirl pipeline``, the tests): the stages after a ZeRO-3 one then compute as a fresh process does.
    """
    linear, manual_seed = torch.nn.functional.linear, torch.manual_seed
    try:
        yield
    finally:
        torch.nn.functional.linear, torch.manual_seed = linear, manual_seed
