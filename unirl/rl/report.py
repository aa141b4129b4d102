"""What an RL run writes besides checkpoints: per-step reward monitors, the reward curve (CSV for DVC plots + PNG)
and the before/after sample grid (same prompts, same seeds; the frozen reference is the "before" model)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unirl.atomic import atomic_output, atomic_write_text

if TYPE_CHECKING:
    from unirl.rl.scenario import Scenario

__all__ = ["before_after_grid", "step_metrics", "write_reward_curve"]


def step_metrics(rewards: torch.Tensor, parts: dict[str, list[float]], adv: torch.Tensor) -> dict[str, float]:
    """Per-step reward monitors: mean/std of the total and of every reward, mean |advantage|."""
    out = {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(correction=0))}
    for name, vals in parts.items():
        t = torch.tensor(vals, dtype=torch.float64)
        out[f"reward/{name}/mean"] = float(t.mean())
        out[f"reward/{name}/std"] = float(t.std(correction=0))
    out["adv/abs_mean"] = float(adv.abs().mean())
    return out


def write_reward_curve(history: list[dict[str, float]], csv_path: Path, png_path: Path) -> Any:
    """``history`` rows -> CSV (step + every metric) and a PNG of the reward curves; returns the figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({k for row in history for k in row if k != "step"})
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["step", *keys])
    w.writeheader()
    for row in history:
        w.writerow({k: row.get(k, "") for k in ["step", *keys]})
    atomic_write_text(csv_path, buf.getvalue())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["step"] for r in history]
    for k in [k for k in keys if k.startswith("reward/") and k.endswith("/mean")] or ["reward/mean"]:
        label = "total (weighted)" if k == "reward/mean" else k.removeprefix("reward/").removesuffix("/mean")
        ax.plot(steps, [r.get(k, math.nan) for r in history], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (rollout mean)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_output(png_path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return fig


def before_after_grid(scenario: Scenario, before_model: Any, after_model: Any, prompts: list[dict], seed: int):
    """Grid: row pairs (before, after) per chunk of prompts, same prompts and seeds; None without images."""
    from unirl.eval.grid import make_grid

    before, caps = scenario.preview(before_model, prompts, seed)
    after, _ = scenario.preview(after_model, prompts, seed)
    if not before:
        return None
    cols = min(8, len(before))
    images, captions = [], []
    for i in range(0, len(before), cols):
        images += before[i : i + cols] + after[i : i + cols]
        captions += [f"before: {c}" for c in caps[i : i + cols]] + [f"after: {c}" for c in caps[i : i + cols]]
    return make_grid(images, captions, cols=cols)
