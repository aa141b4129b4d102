"""The whole pipeline end to end on a micro budget: `dvc repro` in a temporary copy; every Dagster asset in process.

Both run the real stages (curate -> validate -> tokenizer -> vae -> sft -> rl x6 -> eval -> promote) with a few
steps each, against a temporary MLflow sqlite store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, micro_params

from unirl.train.distributed import child_env

SCENARIOS = ("understand", "t2i", "t2i_cot", "edit", "prompt_refine", "reflect")


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc.stdout + proc.stderr


def _check_outputs(root: Path) -> None:
    assert (root / "data/models/sft/model.safetensors").exists()
    for s in SCENARIOS:
        assert (root / f"data/models/rl_{s}/model.safetensors").exists(), s
        metrics = json.loads((root / f"data/reports/rl_{s}/metrics.json").read_text())
        assert metrics["steps"] == 1 and metrics["before"] and metrics["after"], s
    results = json.loads((root / "data/eval/results.json").read_text())
    assert set(results["checkpoints"]) == {"sft", *(f"rl_{s}" for s in SCENARIOS)}
    assert "geneval/overall" in results["checkpoints"]["sft"]
    decision = json.loads((root / "data/promotion/decision.json").read_text())
    assert decision


@pytest.mark.slow
def test_dvc_repro_runs_the_whole_pipeline_then_nothing(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("unirl", "configs"):
        shutil.copytree(ROOT / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = micro_params(repo)
    bindir = str(Path(sys.executable).parent)
    # child_env: without the 1-process group variables an in-process DeepSpeed test of this pytest process exported
    # (a child seeing WORLD_SIZE takes itself for a launcher's rank and would not relaunch `sft`).
    env = {**child_env(), "PATH": bindir + os.pathsep + os.environ["PATH"], "UNIRL_PARAMS": str(params),
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    _run(["git", "init", "-q"], repo, env)
    _run([f"{bindir}/dvc", "init", "-q"], repo, env)
    _run([f"{bindir}/dvc", "config", "core.analytics", "false"], repo, env)
    out = _run([f"{bindir}/dvc", "repro"], repo, env)
    for stage in ("curate", "validate", "tokenizer", "vae", "sft", *(f"rl@{s}" for s in SCENARIOS), "eval", "promote"):
        assert f"Running stage '{stage}'" in out, stage
    _check_outputs(repo)
    out = _run([f"{bindir}/dvc", "repro"], repo, env)
    assert "Running stage" not in out
    # A parameter of one RL scenario reruns that scenario and what depends on it only.
    values = yaml.safe_load(params.read_text())
    values["rl_scenarios"]["t2i"]["rewards"] = {"geneval": 2.0}
    params.write_text(yaml.safe_dump(values, sort_keys=False))
    out = _run([f"{bindir}/dvc", "repro"], repo, env)
    assert "Running stage 'rl@t2i'" in out and "Running stage 'eval'" in out
    assert "Running stage 'sft'" not in out and "Running stage 'rl@edit'" not in out
    metrics = _run([f"{bindir}/dvc", "metrics", "show", "--json"], repo, env)
    assert "data/eval/metrics.json" in metrics


@pytest.mark.slow
def test_unirl_pipeline_runs_every_stage_in_order(tmp_path):
    """`unirl pipeline` (no DVC): each stage once, in order; `sft` relaunches itself under torchrun (2 processes)."""
    params = micro_params(tmp_path)
    env = {**child_env(), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}  # as in the test above
    out = _run([sys.executable, "-m", "unirl.cli", "--params", str(params), "pipeline"], tmp_path, env)
    banners = [line for line in out.splitlines() if line.startswith("==> unirl ")]
    stages = ("curate", "validate", "tokenizer", "vae", "sft", *(f"rl --scenario {s}" for s in SCENARIOS), "eval",
              "promote")
    assert banners == [f"==> unirl {stage}" for stage in stages]
    relaunches = [line for line in out.splitlines() if line.startswith("==> ") and "torch.distributed.run" in line]
    assert len(relaunches) == 1 and "--nproc_per_node 2" in relaunches[0] and relaunches[0].endswith(" sft")
    _check_outputs(tmp_path)


@pytest.mark.slow
def test_every_dagster_asset_materialises_in_process(tmp_path, monkeypatch):
    import dagster as dg

    from pipelines.definitions import build_definitions

    params = micro_params(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    defs = build_definitions(str(params))
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance)
    assert result.success
    events = result.get_asset_materialization_events()
    mats = {m.asset_key.to_user_string(): m.materialization.metadata for m in events}
    assert {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()} == set(mats)
    assert all(c.passed for c in result.get_asset_check_evaluations())
    assert "reconstructions" in mats["vae"] and (tmp_path / "data/models/vae/config.json").is_file()
    assert "samples" in mats["sft_model"] and "reward_curve" in mats["rl_t2i"]
    assert "table" in mats["eval_results"]
    _check_outputs(tmp_path)
