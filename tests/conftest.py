"""Shared fixtures: a small params.yaml in a temporary project directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def small_params(tmp: Path, per_tag: int = 12) -> Path:
    """Write a params.yaml like the project's, with tiny data sizes and every output under ``tmp``."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    cur = params["curate"]
    cur["samples_per_tag"] = {task: per_tag for task in cur["samples_per_tag"]}
    for key in ("out_dir", "corpus_path", "preview_path", "geneval_path"):
        cur[key] = str(tmp / cur[key])
    val = params["validate"]
    val["shards_dir"] = cur["out_dir"]
    val["report_path"] = str(tmp / val["report_path"])
    # Tiny sets cannot be balanced to the default tolerance; balance is tested on full-size sets elsewhere.
    val["tag_balance_tolerance"] = 1.0
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    return small_params(tmp_path)
