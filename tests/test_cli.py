"""The `unirl` command: stage configs from params.yaml, overrides, errors, and the import path."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import ROOT
from test_importers import _caption_tar, _edit_table

from unirl.cli import main
from unirl.data.shards import read_samples


def test_show_config_applies_overrides(params_file, capsys):
    assert main(["--params", str(params_file), "curate", "--set", "resolution=64", "--show-config"]) == 0
    out = capsys.readouterr().out
    assert "resolution = 64" in out and "# Canvas side in pixels" in out


def test_curate_one_task_from_the_shell(params_file, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "unirl.cli", "--params", str(params_file), "curate", "--task", "t2i"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["t2i"]) == {"train", "val", "test"}
    assert (tmp_path / "data/shards/t2i/manifest.json").exists()


def test_an_in_process_one_process_group_does_not_stop_a_later_relaunch():
    """An in-process DeepSpeed stage exports WORLD_SIZE=1 for its own group; a later stage of the same process
    (`unirl pipeline`) must still relaunch under torchrun, and its ranks must not inherit those variables."""
    from unirl.train.distributed import child_env

    code = ("import json, os; from unirl.train.distributed import init_distributed; "
            "from unirl.cli import relaunch_command, _relaunch_env; from unirl.train.sft import SFTConfig; "
            "init_distributed(require_group=True); "
            "cmd = relaunch_command(SFTConfig(processes=2), ['sft']); "
            "print(json.dumps([os.environ['WORLD_SIZE'], cmd is not None, "
            "sorted(set(_relaunch_env()) & {'RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT'})]))")
    proc = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["1", True, []]


def test_cli_names_the_scenarios_the_rl_engine_registers():
    from unirl.cli import SCENARIOS
    from unirl.rl.scenario import SCENARIOS as ENGINE_SCENARIOS

    assert SCENARIOS == ENGINE_SCENARIOS


def test_unknown_override_names_the_key(params_file):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['resolutoin'\]"):
        main(["--params", str(params_file), "curate", "--set", "resolutoin=64"])


def test_import_data_writes_split_shard_sets(params_file, tmp_path, capsys):
    _caption_tar(tmp_path / "captions.tar")
    pq.write_table(_edit_table(), tmp_path / "edits.parquet")
    argv = ["--params", str(params_file), "import-data", "--name", "real",
            "--captions", str(tmp_path / "captions.tar"), "--edits", str(tmp_path / "edits.parquet")]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sum(summary["real_t2i"].values()) == 4 and sum(summary["real_edit"].values()) == 2
    shards = tmp_path / "data/shards/real_t2i"
    prompts = {s.meta["prompt"] for split in summary["real_t2i"] for s in read_samples(shards, split, task="t2i")}
    assert "a green square" in prompts


def test_import_data_without_inputs_is_an_error(params_file):
    with pytest.raises(ValueError, match="nothing to import"):
        main(["--params", str(params_file), "import-data"])


def test_relaunch_command_for_local_processes(monkeypatch):
    from unirl.cli import relaunch_command
    from unirl.train.sft import SFTConfig

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--params", "p.yaml", "sft", "--set", "seed=1"]
    assert relaunch_command(SFTConfig(processes=1), argv) is None
    cmd = relaunch_command(SFTConfig(processes=2), argv)
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", "unirl.cli", *argv]
    monkeypatch.setenv("WORLD_SIZE", "2")  # already a rank of a torchrun/deepspeed job: run in place
    assert relaunch_command(SFTConfig(processes=2), argv) is None
    with pytest.raises(SystemExit, match="processes must be >= 1"):
        relaunch_command(SFTConfig(processes=0), argv)
