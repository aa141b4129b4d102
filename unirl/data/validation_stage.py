"""The validate stage: every shard set through its Great Expectations suite before anything trains on it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from unirl.atomic import atomic_write_json
from unirl.config import option
from unirl.data import shapes
from unirl.data import tasks as task_lib
from unirl.data.validate import ValidationReport, raise_on_failure, validate_shards


@dataclass
class ValidateConfig:
    """Parameters of the ``validate`` stage (``params.yaml: validate``)."""

    shards_dir: str = option("data/shards", "Root of the shard sets written by the curate stage.")
    report_path: str = option("data/validation/report.json", "Where the combined validation report is written.")
    resolution: int = option(32, "Expected image side in pixels (must match curate.resolution).")
    tasks: list = option(list(task_lib.TASKS), "Shard sets to validate.")
    tag_balance_tolerance: float = option(
        0.5, "Each tag's share may deviate from the uniform share by this fraction of it."
    )


def validate_task(cfg: ValidateConfig, task: str) -> ValidationReport:
    """Run the GX suite on one task's shard set."""
    return validate_shards(
        cfg.shards_dir,
        task,
        resolution=cfg.resolution,
        allowed_tags=set(task_lib.TAGS[task]),
        allowed_classes=set(shapes.SHAPES),
        tag_balance_tolerance=cfg.tag_balance_tolerance,
        disjoint_by=("prompt", "scene_id"),
    )


def run_validate(cfg: ValidateConfig) -> dict[str, Any]:
    """``unirl validate``: validate every task, write the combined report, and fail on any failed expectation."""
    reports = {task: validate_task(cfg, task) for task in cfg.tasks}
    summary = {
        "success": all(r.success for r in reports.values()),
        "tasks": {t: {"success": r.success, "failed": r.failed, "evaluated": r.evaluated} for t, r in reports.items()},
    }
    atomic_write_json(cfg.report_path, summary, sort_keys=False)
    for report in reports.values():
        raise_on_failure(report)
    return summary
