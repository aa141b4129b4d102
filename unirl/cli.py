"""The ``unirl`` command: one subcommand per pipeline stage, each reading its section of ``params.yaml``.

    unirl curate [--task t2i] [--set resolution=64]   render the task shards
    unirl import-data --captions a.tar --edits b.parquet
    unirl validate                                      GX suites over every shard set
    unirl tokenizer                                     train the tokenizer on the curated corpus
    unirl vae                                           train the tiny profile's autoencoder on the curated images
    unirl sft                                           LM cold start + DM flow matching
    unirl rl --scenario t2i                             GRPO in one of the six scenarios
    unirl eval                                          every benchmark on every checkpoint
    unirl eval geneval --images DIR                     score a GenEval-layout image folder
    unirl promote                                       registry promotion (champion / challenger)
    unirl pipeline                                      every stage in order, without DVC's caching

``--set key=value`` overrides a field of the stage's config (YAML-parsed value); ``--params`` picks another file.
The same entry points back the DVC stages and the Dagster assets. ``processes: N`` in the ``sft`` or ``rl`` section
makes the stage replace itself with ``torchrun --standalone --nproc_per_node N`` running the same command.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

from unirl.config import config_help, load_config
from unirl.hostmem import retain_freed_memory

# The scenarios of unirl.rl.scenario, named here so that parsing a command imports no torch (tests/test_cli.py checks
# that the two agree).
SCENARIOS: tuple[str, ...] = ("understand", "t2i", "t2i_cot", "edit", "prompt_refine", "reflect")


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
    "tokenizer": Stage(
        "unirl.models.tokenizer:TokenizerConfig", "tokenizer", "unirl.models.tokenizer:build_tokenizer",
        "train the BPE tokenizer on the curated corpus",
    ),
    "vae": Stage("unirl.train.vae:VAEStageConfig", "vae", "unirl.train.vae:train_vae",
                 "train the profile's autoencoder (DC-AE) on the curated images"),
    "sft": Stage("unirl.train.sft:SFTConfig", "sft", "unirl.train.sft:run_sft", "supervised fine-tuning (LM + DM)"),
    "rl": Stage("unirl.rl.trainer:RLConfig", "rl", "unirl.rl.trainer:run_rl", "GRPO in one scenario"),
    "eval": Stage("unirl.eval.report:EvalConfig", "eval", "unirl.eval.report:run_cli", "run the benchmarks"),
    "promote": Stage(
        "unirl.promotion:PromoteConfig", "promote", "unirl.promotion:run_promote",
        "register evaluated checkpoints and move the champion alias",
    ),
}
RELAUNCHABLE: tuple[str, ...] = ("sft", "rl")  # stages whose config has `processes` (local torchrun relaunch)
PIPELINE: tuple[str, ...] = (
    "curate", "validate", "tokenizer", "vae", "sft", *(f"rl:{s}" for s in SCENARIOS), "eval", "promote",
)


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


def load_stage_config(stage_name: str, params: str | None = None, overrides: dict[str, Any] | None = None,
                      scenario: str | None = None) -> Any:
    """The resolved config of a stage (RL: the shared ``rl`` section merged with ``rl.scenarios.<scenario>``)."""
    if stage_name == "rl":
        from unirl.rl.trainer import load_rl_config

        return load_rl_config(scenario or "t2i", params, overrides)
    stage = STAGES[stage_name]
    return load_config(_load(stage.config), stage.section, params, overrides)


def run_stage(
    stage_name: str, params: str | None = None, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> Any:
    """Load stage ``stage_name``'s config from params (+ overrides) and run it; returns the runner's summary.

    ``stage_name`` may be ``rl:<scenario>``.
    """
    if stage_name.startswith("rl:"):
        stage_name, kwargs["scenario"] = "rl", stage_name.split(":", 1)[1]
    if stage_name == "rl":
        from unirl.rl.trainer import train_rl

        return train_rl(load_stage_config("rl", params, overrides, kwargs.pop("scenario", None)))
    cfg = load_stage_config(stage_name, params, overrides)
    runner: Callable[..., Any] = _load(STAGES[stage_name].runner)
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
        if name == "rl":
            p.add_argument("--scenario", required=True, choices=SCENARIOS, help="which of the six scenarios")
        if name == "eval":
            p.add_argument("action", nargs="?", default="all", choices=["all", "geneval"],
                           help="all = every benchmark of params.yaml; geneval = score a GenEval image folder")
            p.add_argument("--images", default=None, help="(geneval) folder laid out as GenEval's generation script")
            p.add_argument("--detector", default=None, help="(geneval) detector 'module:callable' (default: Shapes)")
            p.add_argument("--out", default=None, help="(geneval) also write per-image records (results.jsonl)")
    sub.add_parser("pipeline", help="run every stage in order: " + " -> ".join(PIPELINE))
    return parser


def relaunch_command(cfg: Any, argv: list[str]) -> list[str] | None:
    """The ``torchrun --standalone`` command that reruns this CLI call in ``cfg.processes`` local processes.

    None when the stage has no ``processes`` field, asks for one process, or already runs under a launcher
    (``torchrun``/``deepspeed`` export ``WORLD_SIZE``; their world size then applies).
    """
    n = int(getattr(cfg, "processes", 1))
    if n < 1:
        raise SystemExit(f"processes must be >= 1, got {n}")
    if n == 1:
        return None
    from unirl.train.distributed import under_launcher  # torch: only when a relaunch is in question

    if under_launcher():
        return None
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "unirl.cli", *argv]


def _stage_relaunch(stage: str, params: str | None, overrides: dict[str, Any] | None, scenario: str | None,
                    argv: list[str]) -> list[str] | None:
    """:func:`relaunch_command` for the stages with a ``processes`` field (``sft``, ``rl``); None for the others."""
    if stage not in RELAUNCHABLE:
        return None
    return relaunch_command(load_stage_config(stage, params, overrides, scenario), argv)


def _relaunch_env() -> dict[str, str]:
    """The environment of a relaunch: each rank sets its intra-op threads from the stage's ``torch_threads``;
    without an earlier in-process stage's 1-process group variables (:func:`unirl.train.distributed.child_env`)."""
    from unirl.train.distributed import child_env

    return {**child_env(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    retain_freed_memory()  # large CPU tensors reuse the heap instead of faulting in fresh pages each step
    if args.command == "pipeline":
        from unirl.train.engine import torch_globals_restored

        for name in PIPELINE:
            stage, _, scenario = name.partition(":")
            print(f"==> unirl {stage}" + (f" --scenario {scenario}" if scenario else ""), flush=True)
            stage_argv = [*(["--params", args.params] if args.params else []), stage,
                          *(["--scenario", scenario] if scenario else [])]
            cmd = _stage_relaunch(stage, args.params, None, scenario or None, stage_argv)
            if cmd is None:
                with torch_globals_restored():  # a ZeRO-3 stage must not change the math of the ones after it
                    run_stage(name, args.params)
                continue
            print("==> " + shlex.join(cmd), flush=True)
            if subprocess.run(cmd, env=_relaunch_env(), check=False).returncode != 0:
                raise SystemExit(f"stage {name} failed (see its output above); fix it and rerun `unirl pipeline`")
        return 0
    if args.command == "eval" and args.action == "geneval":
        from unirl.eval.geneval import main as geneval_main

        if not args.images:
            raise SystemExit("unirl eval geneval needs --images DIR")
        extra = [*(["--detector", args.detector] if args.detector else []), *(["--out", args.out] if args.out else [])]
        return geneval_main(["--images", args.images, *extra])
    overrides = _parse_sets(args.set)
    scenario = getattr(args, "scenario", None)
    if args.show_config:
        cfg = load_stage_config(args.command, args.params, overrides, scenario)
        helps = config_help(type(cfg))
        for key, value in vars(cfg).items():
            print(f"{key} = {value!r}    # {helps.get(key, '')}")
        return 0
    cmd = _stage_relaunch(args.command, args.params, overrides, scenario, argv)
    if cmd is not None:  # torchrun replaces this process, so signals (Ctrl-C, Dagster's terminate) reach it
        print("==> " + shlex.join(cmd), flush=True)
        os.execve(cmd[0], cmd, _relaunch_env())
    kwargs: dict[str, Any] = {}
    if args.command == "curate" and args.task:
        kwargs = {"tasks": args.task}
    elif args.command == "import-data":
        kwargs = {"captions": args.captions, "edits": args.edits, "name": args.name}
    elif args.command == "rl":
        kwargs = {"scenario": scenario}
    summary = run_stage(args.command, args.params, overrides, **kwargs)
    line = json.dumps(summary, indent=None, default=str)
    if args.command not in RELAUNCHABLE:
        print(line)
        return 0
    from unirl.train.distributed import print_in_rank_order, shutdown_distributed

    print_in_rank_order(line)  # one whole line per rank: ranks share the launcher's stdout
    shutdown_distributed()  # a launcher's rank leaves its group before exit (see there)
    return 0


if __name__ == "__main__":
    sys.exit(main())
