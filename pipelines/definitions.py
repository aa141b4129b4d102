"""The Dagster code location: `dagster dev` loads this module (configured in pyproject.toml).

Asset graph: shards_<task> (x6, each with a blocking GX check) -> tokenizer_corpus -> tokenizer -> sft_model
(also fed by vae, from shards_t2i and shards_edit) -> rl_<scenario> (x6) -> bench_<benchmark> (x6) -> eval_results
(blocking check: promotable) -> registered_model.
"""

from __future__ import annotations

import dagster as dg

from pipelines.assets import data, evaluate, train
from pipelines.launch import StageLauncher
from pipelines.resources import UnirlParams


def build_definitions(params_path: str | None = None, launcher: StageLauncher | None = None) -> dg.Definitions:
    """All assets and checks, reading ``params_path`` (default: ``$UNIRL_PARAMS`` or ``params.yaml``)."""
    resource = UnirlParams(params_path=params_path) if params_path else UnirlParams()
    return dg.Definitions(
        assets=[
            *data.SHARD_ASSETS, data.tokenizer_corpus, data.geneval_prompts,
            train.tokenizer, train.vae, train.sft_model, *train.RL_ASSETS,
            *evaluate.BENCHMARK_ASSETS, evaluate.eval_results, evaluate.registered_model,
        ],
        asset_checks=[*data.GX_CHECKS, evaluate.results_promotable],
        resources={"unirl": resource, "launcher": launcher or StageLauncher()},
    )


defs = build_definitions()
