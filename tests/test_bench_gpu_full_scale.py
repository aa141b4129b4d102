"""bench/gpu_full_scale.py end to end on the CPU (``--smoke``: tiny profile, small batch), so that the script a GPU
session runs inside its short device time is known to work, with and without the chunked replay."""

from __future__ import annotations

import json
import math
import sys

import pytest


@pytest.mark.parametrize("chunk", [0, 2])
def test_smoke_run_reports_a_full_grpo_step(chunk, load_bench, capsys, monkeypatch):
    bench = load_bench("gpu_full_scale")
    monkeypatch.setattr(sys, "argv", ["gpu_full_scale.py", "--smoke", "--replay-chunk", str(chunk)])
    bench.main()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["device"] == "cpu (smoke)" and out["replay_chunk"] == chunk and out["batch"] == 2
    assert out["diffusers_images_per_s"] > 0 and out["ours_rollout_images_per_s"] > 0
    assert out["rollout_vs_diffusers"] > 0 and set(out["step_s"]) == {"rollout", "reward", "loss"}
    first, last = out["steps"]
    # each step is on-policy: ratio 1 and the rollout's log-probs equal the replay's
    assert all(s["ratio_max_dev"] < 1e-5 and s["logprob_gap"] < 1e-5 for s in out["steps"])
    # the reference is the policy before the first update: KL 0 on step 1, > 0 once the policy moved
    assert first["kl"] == 0.0 and last["kl"] > 0
    assert all(math.isfinite(s["grad_norm"]) and s["grad_norm"] > 0 for s in out["steps"])
