"""SFT worker for the multi-process and kill/resume tests (run by torchrun or as a plain subprocess).

Runs :func:`unirl.train.sft.run_sft` with the config given as JSON (``--config``) and writes
``<out>/rank{R}.json`` with the digest of the final parameters and the summary's paths.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from unirl.config import from_dict
from unirl.train import shutdown_distributed
from unirl.train.sft import SFTConfig, run_sft


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True, help="SFTConfig as a JSON object")
    ap.add_argument("--out", required=True, help="directory for rank{R}.json")
    args = ap.parse_args()
    cfg = from_dict(SFTConfig, json.loads(args.config))
    summary = run_sft(cfg)
    rank = int(os.environ.get("RANK", "0"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shutdown_distributed()
    (out / f"rank{rank}.json").write_text(json.dumps({"digest": summary["param_digest"], "rank": rank}))


if __name__ == "__main__":
    main()
