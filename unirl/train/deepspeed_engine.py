"""The DeepSpeed backend of :mod:`unirl.train.engine`: ``deepspeed.initialize`` with ZeRO stage 1, 2 or 3.

The engine interface, the schedule and the engine-independent checkpoint state are defined once in
:class:`unirl.train.engine.Engine`; this module implements them on DeepSpeed's engine and its tensor-fragment API
(``safe_get_full_fp32_param`` and friends, collective under ZeRO-3), so a checkpoint written here resumes under the
plain-torch backend and vice versa. The ZeRO config comes from ``configs/deepspeed/`` with this run's optimiser,
batch and precision values written over it (:func:`load_deepspeed_config`). On CPU: ``DS_ACCELERATOR=cpu`` + gloo
(:func:`unirl.train.distributed.configure_deepspeed_env`).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unirl.config import PROJECT_ROOT
from unirl.train.distributed import DistInfo
from unirl.train.engine import Engine, EngineConfig

__all__ = ["DeepSpeedEngine", "load_deepspeed_config"]


def load_deepspeed_config(cfg: EngineConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed JSON named by ``cfg.deepspeed_config`` with this config's optimiser/batch/precision values."""
    name = cfg.deepspeed_config
    path = Path(name) if name.endswith(".json") else PROJECT_ROOT / "configs" / "deepspeed" / f"{name}.json"
    if not path.exists():
        raise FileNotFoundError(f"DeepSpeed config {path} not found: use zero1, zero2, zero3 or a path to a .json")
    ds = json.loads(path.read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch_size
    ds["gradient_accumulation_steps"] = cfg.grad_accum_steps
    ds["train_batch_size"] = cfg.micro_batch_size * cfg.grad_accum_steps * world_size
    ds["gradient_clipping"] = float(cfg.grad_clip)
    ds["optimizer"] = {
        "type": "AdamW",
        "params": {
            "lr": cfg.lr,
            "betas": list(cfg.betas),
            "eps": cfg.eps,
            "weight_decay": cfg.weight_decay,
            "torch_adam": True,
        },
    }
    ds.pop("scheduler", None)  # the engine applies the schedule itself (per-group base rates)
    ds["bf16"] = {"enabled": cfg.precision == "bf16"}
    ds["fp16"] = {"enabled": False}
    return ds


class DeepSpeedEngine(Engine):
    """``deepspeed.initialize`` with ZeRO 1/2/3; see :func:`load_deepspeed_config` for the overrides."""

    def __init__(self, module: nn.Module, groups: list[dict], cfg: EngineConfig, info: DistInfo) -> None:
        super().__init__(module, groups, cfg, info)
        import deepspeed

        self._ds_config = load_deepspeed_config(cfg, info.world_size)
        self.zero_stage = int(self._ds_config.get("zero_optimization", {}).get("stage", 0))
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(
                f"{cfg.deepspeed_config}: the deepspeed backend needs ZeRO stage 1, 2 or 3, got {self.zero_stage} "
                "(without ZeRO use backend 'torch')"
            )
        self.ds_engine, self.optimizer, _, _ = deepspeed.initialize(
            model=module, model_parameters=groups, config=self._ds_config
        )

    @property
    def module(self) -> nn.Module:
        return self.ds_engine.module

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeedEngine.forward starts each micro-batch by resetting ZeRO's backward-hook bookkeeping (ZeRO-3
        # counts micro-steps there). The unified model's losses call submodules, not forward, so do it here;
        # a second reset after a real forward is a no-op.
        reset = getattr(self.ds_engine.optimizer, "clear_backward_seen_flag", None)
        if reset is not None:
            reset()
        self.ds_engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself

    def step(self) -> bool:
        boundary = self.ds_engine.is_gradient_accumulation_boundary()
        if boundary:
            self._apply_lr(self.ds_engine.optimizer.param_groups)
        self.ds_engine.step()
        self.micro_step += 1
        if not boundary:
            return False
        norm = self.ds_engine.get_global_grad_norm()  # before clipping, over all ranks
        self.grad_norm = None if norm is None else float(norm)
        self.optimizer_step += 1
        return True

    # --- engine-independent state through DeepSpeed's tensor-fragment API (collective under ZeRO) ---
    def _gathered(self, modify: bool) -> contextlib.AbstractContextManager:
        """ZeRO-3: materialise every full parameter on every rank (``modify``: rank 0's writes are kept)."""
        if self.zero_stage == 3:
            import deepspeed

            params = list(self.module.parameters())
            return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)
        return contextlib.nullcontext()

    def model_state_dict(self) -> dict[str, torch.Tensor]:
        from deepspeed.utils import safe_get_full_fp32_param

        with self._gathered(modify=False):
            state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        for n, p in self.trainable:
            full = safe_get_full_fp32_param(p)
            if full is not None:
                state[n] = full.detach().reshape(state[n].shape)  # fp32 master (bf16 runs save fp32 weights)
        return state

    def _set_model_state(self, state: dict[str, torch.Tensor]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param

        with self._gathered(modify=True), torch.no_grad():
            for k, t in self.module.state_dict(keep_vars=True).items():
                t.data.copy_(state[k].to(t.device, t.dtype).reshape(t.shape))
        for n, p in self.trainable:
            safe_set_full_fp32_param(p, state[n].to(self.device, torch.float32))

    def _ensure_optimizer_state(self) -> None:
        """Create AdamW state on DeepSpeed's flat fp32 partitions if no step ran yet, and (re)link the fragments.

        DeepSpeed 0.19 links each parameter's view of the optimiser state lazily after the first group's step,
        so with several param groups the later groups stay unlinked; relinking here fixes that.
        """
        opt = self.ds_engine.optimizer
        base = opt.optimizer
        flats = opt.fp32_partitioned_groups_flat if self.zero_stage == 3 else opt.single_partition_of_fp32_groups
        for flat in flats:
            st = base.state[flat]
            if "exp_avg" not in st:
                st["step"] = torch.tensor(float(self.optimizer_step))
                st["exp_avg"] = torch.zeros_like(flat)
                st["exp_avg_sq"] = torch.zeros_like(flat)
        if self.zero_stage in (1, 2):
            from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

            for i, flat in enumerate(flats):
                lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], flat, base.state)
            opt._hp_optimizer_states_linked = True

    def _moments(self) -> dict[str, dict[str, torch.Tensor]]:
        from deepspeed.utils import safe_get_full_optimizer_state

        self._ensure_optimizer_state()
        return {
            n: {
                k: safe_get_full_optimizer_state(p, k).detach().reshape(self._shapes[n])
                for k in ("exp_avg", "exp_avg_sq")
            }
            for n, p in self.trainable
        }

    def _set_moments(self, moments: dict[str, dict[str, torch.Tensor]]) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        self._ensure_optimizer_state()
        base = self.ds_engine.optimizer.optimizer
        for st in base.state.values():
            if "step" in st:
                st["step"] = torch.tensor(float(self.optimizer_step))
        for n, p in self.trainable:
            for k in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, moments[n][k].to(self.device, torch.float32), k)
