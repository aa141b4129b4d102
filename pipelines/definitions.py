"""The Dagster code location: `dagster dev` loads this module (configured in pyproject.toml)."""

from __future__ import annotations

import dagster as dg

from pipelines.assets import data
from pipelines.resources import UnirlParams


def build_definitions(params_path: str | None = None) -> dg.Definitions:
    """All assets and checks, reading ``params_path`` (default: ``$UNIRL_PARAMS`` or ``params.yaml``)."""
    resource = UnirlParams(params_path=params_path) if params_path else UnirlParams()
    return dg.Definitions(
        assets=[*data.SHARD_ASSETS, data.tokenizer_corpus, data.geneval_prompts],
        asset_checks=[*data.GX_CHECKS],
        resources={"unirl": resource},
    )


defs = build_definitions()
