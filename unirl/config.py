"""Stage configuration: one dataclass per stage, filled from its section of ``params.yaml``.

Every stage (curate, validate, tokenizer, sft, rl, eval, ...) declares a dataclass whose fields carry a
``help`` text in their metadata. ``load_config(Cls, section)`` builds it from ``params.yaml`` so the CLI,
DVC and Dagster share one schema and one set of defaults. Unknown keys are an error (a typo in
``params.yaml`` must not be silently ignored).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parent.parent  # the source checkout (configs/ lives here)
DEFAULT_PARAMS = "params.yaml"  # relative to the working directory: the project root for DVC, Dagster and make


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse/TRL naming
    """A dataclass field with a default and a help text (mutable defaults are copied per instance)."""
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def params_path(path: str | os.PathLike | None = None) -> Path:
    """Resolve the params file: explicit path, then ``$UNIRL_PARAMS``, then ``./params.yaml``."""
    if path is not None:
        return Path(path)
    return Path(os.environ.get("UNIRL_PARAMS") or DEFAULT_PARAMS)


def load_params(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read the whole ``params.yaml`` as a dict, with a clear error if it is missing or malformed."""
    p = params_path(path)
    if not p.exists():
        raise FileNotFoundError(f"params file not found: {p} (run from the project root or set UNIRL_PARAMS)")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"params file {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"params file {p} must hold a mapping of stage sections, got {type(data).__name__}")
    return data


def from_dict(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Build dataclass ``cls`` from ``values``; nested dataclass fields are built recursively."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        section = where or cls.__name__
        raise ValueError(f"unknown key(s) {unknown} in params section {section}; known: {sorted(fields)}")
    kwargs: dict[str, Any] = {}
    hints = _type_hints(cls)
    for name, value in values.items():
        hint = hints.get(name)
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = from_dict(hint, value, f"{where}.{name}" if where else name)
        kwargs[name] = value
    return cls(**kwargs)


def _type_hints(cls: type) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(cls)
    except Exception:  # pragma: no cover - forward refs that cannot be resolved
        return {}


def merge_overrides(values: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """``values`` updated with ``overrides``; a dotted key (``engine.backend``) sets a field of a nested section."""
    out = dict(values)
    for key, value in (overrides or {}).items():
        head, _, rest = key.partition(".")
        if rest:
            nested = out.get(head)
            nested = dict(nested) if isinstance(nested, dict) else {}
            out[head] = merge_overrides(nested, {rest: value})
        else:
            out[key] = value
    return out


def load_config(
    cls: type[T], section: str, path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> T:
    """Build the stage config ``cls`` from ``params.yaml[section]``, then apply ``overrides``.

    The top-level ``profile`` key (``tiny`` by default) is injected when the dataclass has a ``profile`` field.
    """
    params = load_params(path)
    values = dict(params.get(section) or {})
    field_names = {f.name for f in dataclasses.fields(cls)}
    if "profile" in field_names and "profile" not in values and "profile" in params:
        values["profile"] = params["profile"]
    return from_dict(cls, merge_overrides(values, overrides), section)


def config_help(cls: type) -> dict[str, str]:
    """Field name -> help text, for CLI ``--help`` and docs."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain-dict view of a config (for MLflow params and JSON records)."""
    return dataclasses.asdict(cfg)


def resolve(path: str | os.PathLike) -> Path:
    """Resolve a project-relative path (as written in params.yaml) against the working directory."""
    return Path(path).expanduser().resolve()
