"""Shared fixtures: a small params.yaml in a temporary project directory."""

from __future__ import annotations

import importlib.util
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


@pytest.fixture(autouse=True)
def _restore_deepspeed_patches():
    """Undo what an in-process DeepSpeed ZeRO-3 engine patches into torch for good, so that later tests in this
    process compute as a fresh process does: runs compared bit for bit against a subprocess (resume, DeepSpeed vs
    plain torch) rely on it."""
    from unirl.train.engine import torch_globals_restored

    with torch_globals_restored():
        yield


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    return small_params(tmp_path)


def micro_params(tmp: Path) -> Path:
    """``small_params`` plus a micro budget for every model stage (a few steps each), all outputs under ``tmp``.

    Paths stay project-relative where the stage reads them relative to the working directory, so run the stages
    with ``cwd=tmp`` (DVC in a temporary copy, or Dagster with the working directory set to ``tmp``).
    """
    path = small_params(tmp, per_tag=8)
    params = yaml.safe_load(path.read_text())
    for key in ("out_dir", "corpus_path", "preview_path", "geneval_path"):
        params["curate"][key] = params["curate"][key].replace(str(tmp) + "/", "")
    params["validate"]["shards_dir"] = params["curate"]["out_dir"]
    params["validate"]["report_path"] = params["validate"]["report_path"].replace(str(tmp) + "/", "")
    params["tokenizer"].update(vocab_size=400, min_frequency=1)
    params["sft"] = {
        "lm_steps": 2, "dm_steps": 2, "lm_batch_size": 4, "dm_batch_size": 4, "checkpoint_interval": 2,
        "eval_interval": 2, "eval_per_tag": 1, "eval_lm_per_task": 2, "eval_steps": 2, "eval_max_new_tokens": 8,
        "max_minutes": 5.0, "progress": False,
        "processes": 2, "torch_threads": 1,  # as params.yaml: the stage relaunches itself under torchrun
    }
    params["vae"].update(steps=2, decoder_steps=2, batch_size=4, eval_images=4, min_verifier_agreement=0.0,
                         progress=False)
    params["rl"] = {
        "steps": 1, "prompts_per_step": 1, "group_size": 2, "sde_steps": 2, "max_new_tokens": 8, "eval_prompts": 2,
        "grid_prompts": 2, "eval_batch_size": 2, "progress": False,
    }
    for over in (params.get("rl_scenarios") or {}).values():  # the micro budget, not a scenario's own (t2i_cot: 60)
        for key in ("steps", "prompts_per_step", "group_size", "max_minutes"):
            over.pop(key, None)
    params["eval"].update(
        n_prompts={b: 1 for b in params["eval"]["n_prompts"]}, images_per_prompt=1, steps=2, max_new_tokens=8,
        preview_prompts=1,
    )
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def load_bench():
    """Import a script of ``bench/`` as a module: ``load_bench("verifier_accuracy")``."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    return load
