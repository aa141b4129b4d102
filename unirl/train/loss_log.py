"""The SFT stage's loss history: one row per optimiser step, kept as ``run_dir/loss.csv`` so that a resumed run
keeps the rows before its resume point, and drawn as the per-phase loss plot (raw and smoothed, log scale)."""

from __future__ import annotations

import csv
import io
from pathlib import Path

from unirl.atomic import atomic_output, atomic_write_text

__all__ = ["LossLog"]


class LossLog:
    """Per-step loss rows kept in ``run_dir/loss.csv`` (so a resumed run keeps its history), rank 0 only."""

    def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
        self.path, self.enabled = path, enabled
        self.rows: list[tuple[int, str, float]] = []
        if enabled and resume_step > 0 and path.exists():
            with path.open() as f:
                self.rows = [(int(r["step"]), r["phase"], float(r["loss"])) for r in csv.DictReader(f)
                             if int(r["step"]) <= resume_step]

    def add(self, step: int, phase: str, loss: float) -> None:
        if self.enabled:
            self.rows.append((step, phase, loss))

    def write(self, path: Path | None = None) -> Path | None:
        if not self.enabled:
            return None
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["step", "phase", "loss"])
        w.writerows(self.rows)
        return atomic_write_text(path or self.path, buf.getvalue())

    def plot(self, path: Path) -> Path | None:
        if not self.enabled or not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for ax, phase, title in ((axes[0], "lm", "LM cross-entropy"), (axes[1], "dm", "flow matching MSE")):
            pts = [(s, v) for s, p, v in self.rows if p == phase]
            if pts:
                s, v = zip(*pts)
                k = max(1, len(v) // 50)
                smooth = [sum(v[max(0, i - k):i + 1]) / len(v[max(0, i - k):i + 1]) for i in range(len(v))]
                ax.plot(s, v, alpha=0.25, lw=0.6)
                ax.plot(s, smooth, lw=1.2)
            ax.set_title(title)
            ax.set_xlabel("global step")
            ax.set_yscale("log")
        fig.tight_layout()
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        return path
