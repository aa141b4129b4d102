"""The ``unirl`` command: one subcommand per pipeline stage, each reading its section of ``params.yaml``.

    unirl curate [--task t2i] [--set resolution=64]
    unirl validate
    unirl tokenizer
    unirl sft
    unirl pipeline            # every stage in order (what `dvc repro` runs, without DVC's caching)

``--set key=value`` overrides a field of the stage's config (YAML-parsed value); ``--params`` picks another file.
The same entry points back the DVC stages and the Dagster assets.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from unirl.config import config_help, load_config


@dataclass(frozen=True)
class Stage:
    """A CLI stage: its config class, params section and runner, given as import paths (imported lazily)."""

    config: str  # "module:Class"
    section: str
    runner: str  # "module:function" taking (cfg, **kwargs) and returning a JSON-able summary
    help: str


STAGES: dict[str, Stage] = {
    "curate": Stage("unirl.data.curate:CurateConfig", "curate", "unirl.data.curate:run_cli", "render the task shards"),
    "import-data": Stage(
        "unirl.data.curate:CurateConfig", "curate", "unirl.data.curate:run_import",
        "import image-caption tars / editing parquet files from disk into the shard schema",
    ),
    "validate": Stage(
        "unirl.data.validation_stage:ValidateConfig", "validate", "unirl.data.validation_stage:run_validate",
        "validate every shard set with its Great Expectations suite",
    ),
}
PIPELINE: tuple[str, ...] = tuple(s for s in STAGES if s != "import-data")


def _load(path: str) -> Any:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--set expects key=value, got {pair!r}")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def run_stage(
    stage_name: str, params: str | None = None, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> Any:
    """Load stage ``stage_name``'s config from params (+ overrides) and run it; returns the runner's summary."""
    stage = STAGES[stage_name]
    cfg = load_config(_load(stage.config), stage.section, params, overrides)
    runner: Callable[..., Any] = _load(stage.runner)
    return runner(cfg, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unirl", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=None, help="params file (default: ./params.yaml or $UNIRL_PARAMS)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, stage in STAGES.items():
        p = sub.add_parser(name, help=stage.help)
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
        p.add_argument("--show-config", action="store_true", help="print the resolved config and its help, then exit")
        if name == "curate":
            p.add_argument("--task", action="append", default=None, help="curate only this task (repeatable)")
        if name == "import-data":
            p.add_argument("--captions", nargs="+", default=None, help="image-caption WebDataset tars or folders")
            p.add_argument("--edits", nargs="+", default=None, help="editing parquet files")
            p.add_argument("--name", default="imported", help="shard sets <out_dir>/<name>_t2i and <name>_edit")
    sub.add_parser("pipeline", help="run every stage in order: " + " -> ".join(PIPELINE))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "pipeline":
        for name in PIPELINE:
            print(f"==> unirl {name}", flush=True)
            run_stage(name, args.params)
        return 0
    stage = STAGES[args.command]
    overrides = _parse_sets(args.set)
    if args.show_config:
        cls = _load(stage.config)
        cfg = load_config(cls, stage.section, args.params, overrides)
        helps = config_help(cls)
        for key, value in vars(cfg).items():
            print(f"{key} = {value!r}    # {helps.get(key, '')}")
        return 0
    kwargs: dict[str, Any] = {}
    if args.command == "curate" and args.task:
        kwargs = {"tasks": args.task}
    elif args.command == "import-data":
        kwargs = {"captions": args.captions, "edits": args.edits, "name": args.name}
    summary = run_stage(args.command, args.params, overrides, **kwargs)
    print(json.dumps(summary, indent=None, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
