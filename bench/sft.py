"""SFT DiT training throughput and peak memory of the tiny profile: plain-torch vs DeepSpeed engines, one run.

    .venv/bin/python bench/sft.py [--steps 20] [--warmup 3] [--batch 16] [--threads 1]

Each engine runs in its own subprocess (so peak memory is its own): the real SFT DM step
(:func:`unirl.train.sft._dm_step`: LM-frozen encode + flow matching + engine backward/step) on 32 px t2i
batches with the tiny profile and the built-in tiny tokenizer (no data stages needed; synthetic images and
prompts). Throughput is images per second over ``--steps`` timed steps after ``--warmup``; peak memory is the
process's peak resident set (``ru_maxrss``) on CPU, ``torch.cuda.max_memory_allocated`` on a GPU. DeepSpeed runs
ZeRO-2 as one process (gloo, ``DS_ACCELERATOR=cpu`` on CPU). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(backend: str, steps: int, warmup: int, batch: int, threads: int) -> dict[str, float | str]:
    import numpy as np
    import torch

    from unirl.data.t2i_prompts import phrase, sample_spec
    from unirl.models.tiny import tiny_model
    from unirl.train.engine import EngineConfig
    from unirl.train.sft import SFTConfig, _dm_step, _phase_engine
    from unirl.train.sft_data import DMData

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as d:
        model = tiny_model(d)
    dev = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    model.to(dev).train()
    import random

    rng = random.Random(0)
    prompts = [phrase(sample_spec("single_object", rng), rng) for _ in range(256)]
    g = torch.Generator().manual_seed(0)
    lat = torch.rand((256, *model.latent_shape), generator=g) * 2 - 1  # (N, C, h, w)
    data = DMData(lat, prompts, ["single_object"] * 256, lat[:0], lat[:0], [], [])
    cfg = SFTConfig(dm_batch_size=batch, edit_fraction=0.0, dm_steps=steps + warmup,
                    engine=EngineConfig(backend=backend, micro_batch_size=batch, warmup_steps=0))
    engine = _phase_engine(model, cfg, "dm")
    tag_index = data.tag_index()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for s in range(warmup):
        _dm_step(engine, cfg, data, tag_index, s, 0)
    start = time.perf_counter()
    losses = [_dm_step(engine, cfg, data, tag_index, warmup + s, 0)[0] for s in range(steps)]
    seconds = time.perf_counter() - start
    if dev.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    n_params = sum(p.numel() for _, p in engine.trainable)
    return {"backend": backend, "device": dev.type, "images_per_s": round(steps * batch / seconds, 2),
            "step_s": round(seconds / steps, 4), "peak_mem_mb": round(peak_mb, 1),
            "trainable_params": n_params, "final_loss": round(float(np.mean(losses[-5:])), 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backends", nargs="+", default=["torch", "deepspeed"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.warmup, args.batch, args.threads)))
        return
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(root))
    if env["DS_ACCELERATOR"] == "cpu":
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    results = {}
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--child", backend, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch", str(args.batch), "--threads", str(args.threads)]
        out = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{backend} benchmark failed:\n{out.stderr[-3000:]}")
        results[backend] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'engine':10s} {'images/s':>9s} {'s/step':>8s} {'peak MB':>9s}")
    for b, r in results.items():
        print(f"{b:10s} {r['images_per_s']:9.2f} {r['step_s']:8.3f} {r['peak_mem_mb']:9.1f}")
    print(json.dumps({"batch": args.batch, "steps": args.steps, "threads": args.threads, "results": results}))


if __name__ == "__main__":
    main()
