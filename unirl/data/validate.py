"""Great Expectations (GX Core 1.x) validation of a shard set's metadata table.

The table is :func:`metadata_table` (one row per sample, built from the JSON members and the image headers only,
so it is fast) plus derived per-row columns:
``prompt_n_splits`` (``scene_n_splits``): the number of distinct splits holding that row's prompt (scene), which
must be 1 for the splits to be disjoint. Tag balance is checked on a second, small table with one row per allowed
tag: ``share_ratio`` = (the tag's share of the rows) / (the uniform share 1/K), which must lie within
``1 ± tag_balance_tolerance`` (a missing tag has ratio 0 and fails).

Both tables are validated in one ephemeral GX context (pandas data source, a whole-dataframe batch definition,
an ``ExpectationSuite`` and a ``ValidationDefinition`` per table). Every expectation carries a short name in its
``meta`` (e.g. ``tag_known``); a failed or erroring expectation makes the report fail with its name, observed
value and unexpected examples (with the sample keys) in the summary. Nothing here raises on bad data except
:func:`raise_on_failure`, which the DVC stage and the Dagster check call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from PIL import Image

from unirl.atomic import atomic_write_json
from unirl.data.shards import (
    IMAGE_EXTS,
    REQUIRED_IMAGES,
    ShardError,
    list_shards,
    open_checked_tar,
    read_member,
    split_member,
    split_of,
)

if TYPE_CHECKING:
    from great_expectations.data_context import AbstractDataContext

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")
N_EXAMPLES = 10


class ValidationError(ValueError):
    """Raised by :func:`raise_on_failure` when a shard set fails its expectations."""


@dataclass
class ExpectationOutcome:
    """The result of one expectation, reduced to JSON-friendly values."""

    name: str
    expectation: str
    column: str | None
    success: bool
    observed_value: Any = None
    unexpected_count: int | None = None
    unexpected_examples: list[Any] = field(default_factory=list)
    unexpected_keys: list[Any] = field(default_factory=list)  # sample keys (tags for the balance table)
    error: str | None = None

    def describe(self) -> str:
        col = f" on {self.column!r}" if self.column else ""
        parts = [f"{self.name} ({self.expectation}{col})"]
        if self.error:
            parts.append(f"error: {self.error}")
        if self.unexpected_count:
            parts.append(f"{self.unexpected_count} unexpected, e.g. {self.unexpected_examples[:3]}")
            if self.unexpected_keys:
                parts.append(f"at {self.unexpected_keys[:3]}")
        elif self.observed_value is not None:
            parts.append(f"observed {self.observed_value}")
        return " ".join(parts)


@dataclass
class ValidationReport:
    """Outcome of one task's suite: ``success`` is True only if every expectation passed."""

    task: str
    success: bool
    n_rows: int
    results: list[ExpectationOutcome]
    summary: str

    @property
    def failed(self) -> list[str]:
        """Names of the failed expectations."""
        return [r.name for r in self.results if not r.success]

    @property
    def evaluated(self) -> int:
        """Number of expectations evaluated."""
        return len(self.results)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["failed"] = self.failed
        return _jsonable(d)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the report atomically as JSON."""
        return atomic_write_json(path, self.to_dict())


@dataclass
class ValidationSpec:
    """What one task's shard set must satisfy (the keyword arguments of :func:`validate_shards`)."""

    resolution: int | tuple[int, int]
    allowed_tags: Iterable[str]
    allowed_classes: Iterable[str]
    tag_balance_tolerance: float | None = 0.5
    count_range: tuple[int, int] = (1, 4)
    images_required: bool | None = None
    allowed_splits: Sequence[str] = SPLITS
    disjoint_by: Sequence[str] = ("prompt",)


TABLE_COLUMNS = ("key", "task", "split", "tag", "prompt", "n_include", "classes", "max_count", "min_count", "width",
                 "height", "sizes_agree", "n_images", "scene_id", "shard")


def _main_image(exts: Sequence[str]) -> str | None:
    for e in ("png", "jpg", "jpeg", "tgt.png"):
        if e in exts:
            return e
    return sorted(exts)[0] if exts else None


def scene_id(meta: dict[str, Any]) -> str | None:
    """A short hash of ``meta["scene"]`` (canonical JSON), or None when the sample has no scene.

    An empty canvas (a reflection case whose only object is missing) is no scene identity: None too.
    """
    scene = meta.get("scene")
    if scene is None or not scene.get("objects"):
        return None
    return hashlib.sha1(json.dumps(scene, sort_keys=True).encode()).hexdigest()[:16]


def metadata_table(root: str | os.PathLike, task: str) -> pd.DataFrame:
    """One row per sample of ``task`` (all splits): JSON fields plus image sizes read from the image headers only.

    ``classes`` joins the include classes with ``,``; ``max_count``/``min_count`` are over include clauses
    (null when there are none); ``width``/``height`` are the main image's (the first of ``png``, ``jpg``,
    ``jpeg``, ``tgt.png``, else the first by name), null for text-only samples; ``sizes_agree`` says whether all
    images of the sample share one size.
    Raises :class:`ShardError` (file and key named) on unreadable shards, missing or invalid JSON.
    """
    rows: list[dict[str, Any]] = []
    root = Path(root)
    for path in list_shards(root, task):
        split = split_of(path)
        tf, groups = open_checked_tar(path)
        with tf:
            for group in groups:
                key = split_member(group[0].name)[0]
                parts = {split_member(m.name)[1]: m for m in group}
                if "json" not in parts:
                    raise ShardError(f"{path}: sample {key!r}: no 'json' member (has {sorted(parts)})")
                try:
                    meta = json.loads(read_member(tf, parts["json"], path, key).decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ShardError(f"{path}: sample {key!r}: invalid JSON metadata ({e})") from e
                if not isinstance(meta, dict):
                    raise ShardError(f"{path}: sample {key!r}: JSON metadata must be an object")
                sizes: dict[str, tuple[int, int]] = {}
                for ext, m in parts.items():
                    if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS:
                        try:
                            f = tf.extractfile(m)
                            assert f is not None
                            with Image.open(f) as im:  # reads the header only
                                sizes[ext] = im.size
                        except Exception as e:  # noqa: BLE001
                            msg = f"{path}: sample {key!r}: image {ext!r} has no readable header ({e})"
                            raise ShardError(msg) from e
                main = _main_image(list(sizes))
                md = meta.get("metadata") or {}
                include = (md.get("include") or []) if isinstance(md, dict) else []
                counts = [c["count"] for c in include if isinstance(c, dict) and isinstance(c.get("count"), int)]
                rows.append({
                    "key": key, "task": meta.get("task"), "split": split, "tag": meta.get("tag"),
                    "prompt": meta.get("prompt"), "n_include": len(include),
                    "classes": ",".join(str(c.get("class")) for c in include if isinstance(c, dict)),
                    "max_count": max(counts) if counts else None, "min_count": min(counts) if counts else None,
                    "width": sizes[main][0] if main else None, "height": sizes[main][1] if main else None,
                    "sizes_agree": len(set(sizes.values())) <= 1 if sizes else None, "n_images": len(sizes),
                    "scene_id": scene_id(meta), "shard": f"{task}/{path.name}",
                })
    df = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    for col in ("n_include", "max_count", "min_count", "width", "height", "n_images"):
        df[col] = pd.array(df[col], dtype="Int64")
    df["sizes_agree"] = pd.array(df["sizes_agree"], dtype="boolean")
    return df


def make_context() -> AbstractDataContext:
    """A cheap in-memory GX context: no files, no analytics, no progress bars."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple | set):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, str | bytes):  # numpy scalars
        x = x.item()
    if x is None or x is pd.NA or (isinstance(x, float) and math.isnan(x)):
        return None
    if isinstance(x, str | int | float | bool):
        return x
    return str(x)


def derived_table(df: pd.DataFrame, disjoint_by: Sequence[str] = ("prompt",)) -> pd.DataFrame:
    """The metadata table plus ``<col>_n_splits`` per disjointness column (null where the column is null)."""
    out = df.copy()
    for col in disjoint_by:
        base = col.removesuffix("_id")
        n = out.groupby(col, dropna=True)["split"].transform("nunique") if len(out) else pd.Series(dtype="Int64")
        out[f"{base}_n_splits"] = pd.array(n, dtype="Int64")
    return out


def tag_table(df: pd.DataFrame, allowed_tags: Iterable[str]) -> pd.DataFrame:
    """One row per allowed tag: count, share of the rows with allowed tags, and share / uniform share."""
    tags = sorted(set(allowed_tags))
    counts = df["tag"].value_counts() if len(df) else pd.Series(dtype=int)
    n = sum(int(counts.get(t, 0)) for t in tags)
    rows = [{"tag": t, "count": int(counts.get(t, 0))} for t in tags]
    out = pd.DataFrame(rows, columns=["tag", "count"])
    out["share"] = out["count"] / n if n else 0.0
    out["share_ratio"] = out["share"] * len(tags)
    return out


def _class_regex(classes: Iterable[str]) -> str:
    alt = "|".join(re.escape(c) for c in sorted(set(classes)))
    return rf"^(?:(?:{alt})(?:,(?:{alt}))*)?$"


def _expectations(task: str, spec: ValidationSpec) -> list[Any]:
    import great_expectations.expectations as gxe

    w, h = (spec.resolution, spec.resolution) if isinstance(spec.resolution, int) else spec.resolution
    lo, hi = spec.count_range
    images_required = task in REQUIRED_IMAGES if spec.images_required is None else spec.images_required

    def named(name: str, exp: Any) -> Any:
        exp.meta = {"name": name}
        return exp

    exps = [
        named("table_not_empty", gxe.ExpectTableRowCountToBeBetween(min_value=1)),
        named("key_unique", gxe.ExpectColumnValuesToBeUnique(column="key")),
        named("task_matches", gxe.ExpectColumnValuesToBeInSet(column="task", value_set=[task])),
        named("split_known", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(spec.allowed_splits))),
        named("prompt_not_null", gxe.ExpectColumnValuesToNotBeNull(column="prompt")),
        named("prompt_not_empty", gxe.ExpectColumnValuesToNotMatchRegex(column="prompt", regex=r"^\s*$")),
        named("tag_not_null", gxe.ExpectColumnValuesToNotBeNull(column="tag")),
        named("tag_known", gxe.ExpectColumnValuesToBeInSet(column="tag", value_set=sorted(set(spec.allowed_tags)))),
        named("class_known", gxe.ExpectColumnValuesToMatchRegex(column="classes",
                                                                regex=_class_regex(spec.allowed_classes))),
        named("max_count_in_range", gxe.ExpectColumnValuesToBeBetween(column="max_count", min_value=lo, max_value=hi)),
        named("min_count_in_range", gxe.ExpectColumnValuesToBeBetween(column="min_count", min_value=lo, max_value=hi)),
        named("width_is_resolution", gxe.ExpectColumnValuesToBeInSet(column="width", value_set=[w])),
        named("height_is_resolution", gxe.ExpectColumnValuesToBeInSet(column="height", value_set=[h])),
        named("image_sizes_agree", gxe.ExpectColumnValuesToBeInSet(column="sizes_agree", value_set=[True])),
    ]
    if images_required:
        exps.append(named("image_present", gxe.ExpectColumnValuesToNotBeNull(column="width")))
    for col in spec.disjoint_by:
        base = col.removesuffix("_id")
        exps.append(named(f"splits_disjoint_by_{base}",
                          gxe.ExpectColumnValuesToBeInSet(column=f"{base}_n_splits", value_set=[1])))
    return exps


def _run(context: Any, name: str, df: pd.DataFrame, expectations: list[Any], id_column: str) -> list[Any]:
    import great_expectations as gx

    uid = uuid.uuid4().hex[:8]
    source = context.data_sources.add_pandas(f"{name}-{uid}")
    batch_def = source.add_dataframe_asset(name="table").add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"{name}-{uid}"))
    for exp in expectations:
        suite.add_expectation(exp)
    vd = context.validation_definitions.add(gx.ValidationDefinition(name=f"{name}-{uid}", data=batch_def, suite=suite))
    fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": [id_column], "partial_unexpected_count": 20}
    return list(vd.run(batch_parameters={"dataframe": df}, result_format=fmt).results)


def _outcome(er: Any, id_column: str) -> ExpectationOutcome:
    cfg = er.expectation_config
    res = er.result or {}
    exc = er.exception_info or {}
    if exc and "raised_exception" not in exc:  # keyed by metric id: keep the first message
        exc = next(iter(exc.values()), {})
    error = exc.get("exception_message") if exc.get("raised_exception") else None
    index = res.get("partial_unexpected_index_list") or []
    return ExpectationOutcome(
        name=(cfg.meta or {}).get("name", cfg.type),
        expectation=cfg.type,
        column=cfg.kwargs.get("column"),
        success=bool(er.success) and error is None,
        observed_value=_jsonable(res.get("observed_value")),
        unexpected_count=res.get("unexpected_count"),
        unexpected_examples=_jsonable(list(res.get("partial_unexpected_list") or [])[:N_EXAMPLES]),
        unexpected_keys=_jsonable([i.get(id_column) for i in index if isinstance(i, dict)][:N_EXAMPLES]),
        error=error,
    )


def _summary(task: str, n_rows: int, results: list[ExpectationOutcome]) -> str:
    failed = [r for r in results if not r.success]
    head = f"task {task!r}: {len(results) - len(failed)}/{len(results)} expectations passed over {n_rows} rows"
    if not failed:
        return head + ": OK"
    return head + "; FAILED:\n" + "\n".join(f"  - {r.describe()}" for r in failed)


def validate_table(
    df: pd.DataFrame, task: str, spec: ValidationSpec, *, context: AbstractDataContext | None = None
) -> ValidationReport:
    """Run the suite on a metadata table (as :func:`unirl.data.shards.metadata_table` returns)."""
    context = context or make_context()
    table = derived_table(df, spec.disjoint_by)
    results = [_outcome(er, "key") for er in _run(context, f"{task}-samples", table, _expectations(task, spec), "key")]
    if spec.tag_balance_tolerance is not None:
        import great_expectations.expectations as gxe

        tol = float(spec.tag_balance_tolerance)
        exp = gxe.ExpectColumnValuesToBeBetween(column="share_ratio", min_value=1 - tol, max_value=1 + tol)
        exp.meta = {"name": "tag_balance"}
        tags = tag_table(df, spec.allowed_tags)
        results += [_outcome(er, "tag") for er in _run(context, f"{task}-tags", tags, [exp], "tag")]
    success = all(r.success for r in results)
    report = ValidationReport(task=task, success=success, n_rows=len(df), results=results,
                              summary=_summary(task, len(df), results))
    (log.info if success else log.warning)("%s", report.summary)
    return report


def validate_shards(
    root: str | os.PathLike,
    task: str,
    *,
    resolution: int | tuple[int, int],
    allowed_tags: Iterable[str],
    allowed_classes: Iterable[str],
    tag_balance_tolerance: float | None = 0.5,
    count_range: tuple[int, int] = (1, 4),
    images_required: bool | None = None,
    allowed_splits: Sequence[str] = SPLITS,
    disjoint_by: Sequence[str] = ("prompt",),
    context: AbstractDataContext | None = None,
    report_path: str | os.PathLike | None = None,
) -> ValidationReport:
    """Validate the shard set ``<root>/<task>``; an unreadable or missing set gives a failed ``shards_readable``.

    ``images_required`` (default: the task is in ``REQUIRED_IMAGES``) forbids text-only rows. ``disjoint_by``
    may add ``"scene_id"`` to require splits disjoint by scene as well as by prompt. The report is saved to
    ``report_path`` (atomically) when given.
    """
    spec = ValidationSpec(resolution=resolution, allowed_tags=list(allowed_tags),
                          allowed_classes=list(allowed_classes), tag_balance_tolerance=tag_balance_tolerance,
                          count_range=count_range,
                          images_required=images_required, allowed_splits=allowed_splits, disjoint_by=disjoint_by)
    try:
        df = metadata_table(root, task)
    except (ShardError, FileNotFoundError) as e:
        outcome = ExpectationOutcome(name="shards_readable", expectation="read_metadata_table", column=None,
                                     success=False, error=str(e))
        report = ValidationReport(task=task, success=False, n_rows=0, results=[outcome],
                                  summary=_summary(task, 0, [outcome]))
        log.warning("%s", report.summary)
    else:
        report = validate_table(df, task, spec, context=context)
    if report_path is not None:
        report.save(report_path)
    return report


def validate_all(
    root: str | os.PathLike,
    specs: Mapping[str, ValidationSpec],
    *,
    report_path: str | os.PathLike | None = None,
    context: AbstractDataContext | None = None,
) -> dict[str, ValidationReport]:
    """Validate every task in ``specs`` with one GX context; optionally save a combined report atomically."""
    context = context or make_context()
    reports = {
        task: validate_shards(root, task, **{k: getattr(spec, k) for k in spec.__dataclass_fields__}, context=context)
        for task, spec in specs.items()
    }
    if report_path is not None:
        atomic_write_json(report_path, {"success": all(r.success for r in reports.values()),
                                        "tasks": {t: r.to_dict() for t, r in reports.items()}})
    return reports


def raise_on_failure(reports: ValidationReport | Mapping[str, ValidationReport] | Iterable[ValidationReport]) -> None:
    """Raise :class:`ValidationError` naming every failed expectation (with examples) of the given report(s)."""
    if isinstance(reports, ValidationReport):
        reports = [reports]
    elif isinstance(reports, Mapping):
        reports = list(reports.values())
    lines = [f"{r.task}: {o.describe()}" for r in reports for o in r.results if not o.success]
    if lines:
        raise ValidationError(f"shard validation failed ({len(lines)} expectation(s)); fix the data or the curate "
                              "parameters and re-run `unirl curate`:\n" + "\n".join(f"  - {x}" for x in lines))
