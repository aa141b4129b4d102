from dataclasses import dataclass

import pytest

from unirl.config import config_help, load_config, option


@dataclass
class _Cfg:
    lr: float = option(1e-3, "learning rate")
    steps: int = option(10, "optimizer steps")
    names: list = option(["a"], "a list default")
    profile: str = option("tiny", "model profile")


def test_load_config_reads_section_and_overrides(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("profile: full\nstage:\n  lr: 0.5\n")
    cfg = load_config(_Cfg, "stage", p, {"steps": 3})
    assert (cfg.lr, cfg.steps, cfg.profile) == (0.5, 3, "full")
    assert config_help(_Cfg)["lr"] == "learning rate"


def test_mutable_defaults_are_not_shared():
    a, b = _Cfg(), _Cfg()
    a.names.append("b")
    assert b.names == ["a"]


def test_unknown_key_is_an_error(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("stage:\n  lr: 0.5\n  stepz: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stepz'\] in params section stage"):
        load_config(_Cfg, "stage", p)


def test_missing_and_malformed_params_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_config(_Cfg, "stage", tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(_Cfg, "stage", bad)


def test_project_params_load_into_every_stage_config():
    from conftest import ROOT

    from unirl.data.curate import CurateConfig
    from unirl.data.validation_stage import ValidateConfig

    cur = load_config(CurateConfig, "curate", ROOT / "params.yaml")
    val = load_config(ValidateConfig, "validate", ROOT / "params.yaml")
    assert cur.resolution == val.resolution
    assert set(cur.tasks) == set(val.tasks)


def test_dotted_overrides_set_nested_fields(tmp_path):
    from unirl.config import merge_overrides

    merged = merge_overrides({"engine": {"lr": 1, "backend": "torch"}, "x": 1}, {"engine.backend": "ds", "y": 2})
    assert merged == {"engine": {"lr": 1, "backend": "ds"}, "x": 1, "y": 2}
