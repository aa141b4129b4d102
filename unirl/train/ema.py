"""Exponential moving average of trained weights (the weights a diffusion stage saves, not the last iterate).

Variant: the usual diffusion-training EMA (as in DiT/SANA training code and ``diffusers.training_utils.EMAModel``
with ``use_ema_warmup=False``) with the bias warm-up ``d_t = min(decay, (1 + t) / (10 + t))``, ``t`` the number
of updates so far, so that the average is not dominated by the initial weights early on:

    shadow <- d_t * shadow + (1 - d_t) * weight         after every optimiser step

``warmup=False`` applies ``decay`` from the first update (the average then starts at the initial weights, which
keep a share ``decay ** t``): what a short fine-tuning run from a good model wants, e.g. GRPO
(:mod:`unirl.rl.trainer`).

The shadow copy is fp32 whatever the module's dtype, holds only the trained parameters (frozen ones are equal
to the module's anyway), and goes into each training checkpoint so that a resumed run ends with the same average
as an uninterrupted one. Data-parallel ranks hold identical weights after each step, so each keeps its own
identical average and no communication is needed; under ZeRO-3 a rank holds only a partition of each weight, so
the average is refused there (use ZeRO-1/2 or the torch backend).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from unirl.train.checkpoint import CheckpointError, check_key_sets

__all__ = ["WeightEMA"]


class WeightEMA:
    """EMA of the named parameters ``params`` (e.g. ``Engine.trainable``) with decay ``decay`` in (0, 1)."""

    def __init__(self, params: Sequence[tuple[str, nn.Parameter]], decay: float, warmup: bool = True) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay} (0 turns the average off at the caller)")
        for name, p in params:
            if getattr(p, "ds_numel", p.numel()) != p.numel():
                raise ValueError(f"parameter {name!r} is partitioned (DeepSpeed ZeRO-3): the weight average needs "
                                 "full weights on every rank; use ZeRO-1/2 or the torch backend, or set the decay "
                                 "to 0")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.params = list(params)
        self.updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in self.params}

    def current_decay(self) -> float:
        """The decay the next :meth:`update` applies: ``min(decay, (1 + t) / (10 + t))``, or ``decay`` without
        the warm-up."""
        t = self.updates
        return min(self.decay, (1.0 + t) / (10.0 + t)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self) -> None:
        """Fold the parameters' current values into the average (call once per optimiser step)."""
        d = self.current_decay()
        shadows = [self.shadow[n] for n, _ in self.params]
        torch._foreach_lerp_(shadows, [p.detach().float() for _, p in self.params], 1.0 - d)  # one fused op
        self.updates += 1

    def averaged(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``model_state`` with the averaged parameters in place of the trained ones (each in its own dtype)."""
        out = dict(model_state)
        for n, t in self.shadow.items():
            out[n] = t.to(model_state[n].dtype).reshape(model_state[n].shape)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict[str, Any] | None, source: str | Path | None = None) -> None:
        """Restore :meth:`state_dict` (from a checkpoint at ``source``); a clear error if it is absent or differs."""
        where = f" in {source}" if source is not None else ""
        if not state or "shadow" not in state:
            raise CheckpointError(f"no weight average (EMA){where}: the run that wrote it had the average off; resume "
                                  "with the same settings, or start a new run")
        if float(state["decay"]) != self.decay:
            raise CheckpointError(f"the weight average{where} has decay {state['decay']}, this run {self.decay}: "
                                  "resume with the same decay, or start a new run")
        if bool(state.get("warmup", True)) != self.warmup:
            raise CheckpointError(f"the weight average{where} has warmup={state.get('warmup', True)}, this run "
                                  f"{self.warmup}: resume with the same setting, or start a new run")
        check_key_sets(self.shadow.keys(), state["shadow"].keys(), "weight average (EMA)", source)
        self.updates = int(state["updates"])
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t.reshape(self.shadow[n].shape))
