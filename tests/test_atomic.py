"""Atomic writes (unirl.atomic) and the SFT loss history (unirl.train.loss_log) built on them."""

from __future__ import annotations

import json
import os
import stat

import pytest

from unirl.atomic import atomic_write_json, atomic_write_text, staged_dir
from unirl.train.loss_log import LossLog


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("cannot serialise this")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "deep" / "metrics.json"
    atomic_write_json(target, {"b": 1, "a": [1.5, "x"]})
    assert target.read_text() == json.dumps({"a": [1.5, "x"], "b": 1}, indent=2) + "\n"
    with pytest.raises(RuntimeError, match="cannot serialise"):
        atomic_write_json(target, {"a": _Unprintable()})
    assert json.loads(target.read_text()) == {"a": [1.5, "x"], "b": 1}
    assert [p.name for p in target.parent.iterdir()] == ["metrics.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "table.md", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # readable by the team, as a plain open() would make it


def test_json_keeps_insertion_order_when_asked_and_text_is_utf8(tmp_path):
    path = atomic_write_json(tmp_path / "t.json", {"z": 1, "a": 2}, sort_keys=False)
    assert list(json.loads(path.read_text())) == ["z", "a"]
    assert atomic_write_text(tmp_path / "t.md", "größe ✓\n").read_bytes() == "größe ✓\n".encode()


def test_loss_log_resumes_with_the_rows_up_to_its_step_and_plots_both_phases(tmp_path):
    csv_path = tmp_path / "run" / "loss.csv"
    log = LossLog(csv_path, 0, enabled=True)
    for step in range(1, 7):
        log.add(step, "lm" if step <= 3 else "dm", 1.0 / step)
    log.write()
    resumed = LossLog(csv_path, 4, enabled=True)  # a run resumed from step 4 drops the rows after it
    assert resumed.rows == [(s, "lm" if s <= 3 else "dm", 1.0 / s) for s in range(1, 5)]
    png = resumed.plot(tmp_path / "plots" / "loss.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    off = LossLog(tmp_path / "other.csv", 0, enabled=False)  # ranks other than 0 keep and write nothing
    off.add(1, "lm", 1.0)
    assert off.write() is None and off.plot(tmp_path / "x.png") is None and not (tmp_path / "other.csv").exists()


def test_a_staged_folder_replaces_the_old_one_whole_or_not_at_all(tmp_path):
    target = tmp_path / "plots"
    with staged_dir(target) as tmp:
        (tmp / "a.json").write_text("1")
        (tmp / "b.json").write_text("2")
    with pytest.raises(RuntimeError, match="half-way"), staged_dir(target) as tmp:
        (tmp / "c.json").write_text("3")
        raise RuntimeError("failed half-way")
    assert sorted(p.name for p in target.iterdir()) == ["a.json", "b.json"]  # the failed run left no trace
    with staged_dir(target) as tmp:
        (tmp / "c.json").write_text("3")
    assert [p.name for p in target.iterdir()] == ["c.json"]  # no stale files of the earlier, larger run
    assert [p.name for p in tmp_path.iterdir()] == ["plots"] and stat.S_IMODE(target.stat().st_mode) == 0o755
