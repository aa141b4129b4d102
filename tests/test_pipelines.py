"""Orchestration: the Dagster assets and checks materialised in process, and `dvc repro` in a temporary repo."""

from __future__ import annotations

import pytest
from conftest import small_params

MODEL_ASSETS = {"tokenizer", "sft_model", *(f"rl_{s}" for s in ("understand", "t2i", "t2i_cot", "edit",
                                                                    "prompt_refine", "reflect"))}
DATA_ASSETS = {f"shards_{t}" for t in ("t2i", "edit", "t2i_cot", "understand", "prompt_refine", "reflect")} | {
    "tokenizer_corpus",
    "geneval_prompts",
}


def test_definitions_hold_every_data_asset_and_blocking_check():
    from pipelines.definitions import defs

    keys = {k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()}
    assert DATA_ASSETS | MODEL_ASSETS | {"eval_results", "registered_model"} <= keys
    checks = defs.resolve_asset_graph().asset_check_keys
    assert {c.asset_key.to_user_string() for c in checks if c.name == "gx_suite"} == {
        k for k in DATA_ASSETS if k.startswith("shards_")
    }
    assert any(c.asset_key.to_user_string() == "eval_results" for c in checks)


@pytest.mark.slow
def test_data_assets_and_checks_materialise_in_process(tmp_path):
    import dagster as dg

    from pipelines.definitions import build_definitions

    params = small_params(tmp_path)
    defs = build_definitions(str(params))
    job = defs.resolve_implicit_global_asset_job_def()
    data_keys = list(dg.AssetSelection.groups("data").resolve(defs.resolve_asset_graph()))
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(instance=instance, asset_selection=data_keys)
    assert result.success
    mats = {m.asset_key.to_user_string(): m for m in result.get_asset_materialization_events()}
    assert DATA_ASSETS <= set(mats)
    t2i = mats["shards_t2i"].materialization.metadata
    assert t2i["dagster/row_count"].value > 0 and "preview" in t2i
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 6 and all(c.passed for c in checks)
    assert (tmp_path / "data/corpus.txt").stat().st_size > 0
