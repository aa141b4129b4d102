"""Curation throughput: samples per second for render + verify + write, at 32 and 256 px, measured in one run.

    .venv/bin/python bench/curate.py [--per-tag 40] [--resolutions 32 256]

Also times the default tiny dataset's full curation when ``--full`` is given. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from unirl.config import load_config
from unirl.data import tasks as task_lib
from unirl.data.curate import CurateConfig, curate, curate_task


def measure(resolution: int, per_tag: int, tmp: Path) -> dict[str, float]:
    per_task = {t: per_tag for t in task_lib.TASKS}
    cfg = CurateConfig(out_dir=str(tmp / f"r{resolution}"), resolution=resolution, samples_per_tag=per_task)
    n = 0
    start = time.perf_counter()
    for task in task_lib.TASKS:
        manifest = curate_task(cfg, task, progress=False)
        n += sum(manifest["splits"].values())
    seconds = time.perf_counter() - start
    return {"samples": n, "seconds": round(seconds, 2), "samples_per_s": round(n / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-tag", type=int, default=40)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--full", action="store_true", help="also time the default dataset of params.yaml")
    args = parser.parse_args()
    out: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as d:
        for res in args.resolutions:
            out[f"{res}px"] = r = measure(res, args.per_tag, Path(d))
            print(f"{res:>4} px: {r['samples']} samples in {r['seconds']:.1f} s = {r['samples_per_s']:.1f} samples/s")
        if args.full:
            cfg = load_config(CurateConfig, "curate")
            for key in ("out_dir", "corpus_path", "preview_path", "geneval_path"):
                setattr(cfg, key, str(Path(d) / "full" / getattr(cfg, key)))
            start = time.perf_counter()
            manifest = curate(cfg, progress=False)
            seconds = time.perf_counter() - start
            n = sum(sum(m["splits"].values()) for m in manifest["tasks"].values())
            out["default_dataset"] = {"samples": n, "seconds": round(seconds, 1)}
            print(f"default tiny dataset: {n} samples curated in {seconds:.1f} s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
