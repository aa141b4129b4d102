"""Registry promotion: the pure decision rule, and aliases/tags in a real MLflow SQLite store."""

from __future__ import annotations

import json

import mlflow
import pytest
import torch
import yaml

from unirl.eval.report import HEADLINE, TABLE_COLUMNS
from unirl.models.tiny import tiny_model
from unirl.promotion import PromoteConfig, candidate_order, decide, headline_for, run_promote, validate_results

H = ["geneval/overall"]


@pytest.mark.parametrize(
    ("candidate", "champion", "tolerance", "promote", "reason"),
    [
        ({"geneval/overall": 0.1}, None, 0.05, True, "first candidate: no champion yet"),
        # better headline, the other benchmark within the tolerance (drop 0.03 <= 0.05)
        ({"geneval/overall": 0.6, "edit/correct": 0.47}, {"geneval/overall": 0.5, "edit/correct": 0.50}, 0.05, True,
         "headline improved (geneval/overall 0.5000 -> 0.6000); no other benchmark regressed by more than 0.05"),
        # better headline, regression beyond the tolerance
        ({"geneval/overall": 0.6, "edit/correct": 0.40}, {"geneval/overall": 0.5, "edit/correct": 0.50}, 0.05, False,
         "edit/correct regressed 0.5000 -> 0.4000 (-0.1000), beyond the tolerance 0.05"),
        # a drop of exactly the tolerance is allowed (not "more than")
        ({"geneval/overall": 0.6, "edit/correct": 0.45}, {"geneval/overall": 0.5, "edit/correct": 0.50}, 0.05, True,
         "headline improved (geneval/overall 0.5000 -> 0.6000); no other benchmark regressed by more than 0.05"),
        # equal headline does not beat the champion
        ({"geneval/overall": 0.5}, {"geneval/overall": 0.5}, 0.05, False,
         "headline geneval/overall did not beat the champion: 0.5000 <= 0.5000"),
        ({"edit/correct": 0.9}, {"geneval/overall": 0.5}, 0.05, False,
         "candidate has no (finite) value for headline metric geneval/overall"),
        ({"geneval/overall": float("nan")}, {"geneval/overall": 0.5}, 0.05, False,
         "candidate has no (finite) value for headline metric geneval/overall"),
    ],
)
def test_decide(candidate, champion, tolerance, promote, reason):
    assert decide(candidate, champion, H, tolerance) == (promote, reason)


def test_decide_details():
    champ = {"geneval/overall": 0.5, "vqa/accuracy": 0.8, "vqa/count": 0.9}
    cand = {"geneval/overall": 0.7, "vqa/accuracy": 0.8, "vqa/count": 0.2}
    assert not decide(cand, champ, H, 0.05)[0]  # default guard: every shared metric
    assert decide(cand, champ, H, 0.05, guarded=["vqa/accuracy"])[0]  # only the benchmark-level column
    # several headline metrics: all must improve; a headline metric is never a "regression" of itself
    assert decide({"a": 0.6, "b": 0.7}, {"a": 0.5, "b": 0.6}, ["a", "b"], 0.0)[0]
    ok, why = decide({"a": 0.6, "b": 0.6}, {"a": 0.5, "b": 0.6}, ["a", "b"], 0.0)
    assert not ok and why == "headline b did not beat the champion: 0.6000 <= 0.6000"
    ok, why = decide({"a": 0.6}, {"b": 0.6}, ["a"], 0.0)
    assert not ok and "champion has no value for headline metric a" in why
    with pytest.raises(ValueError, match="tolerance"):
        decide({"a": 1.0}, {"a": 0.0}, ["a"], -0.1)
    with pytest.raises(ValueError, match="at least one headline"):
        decide({"a": 1.0}, {"a": 0.0}, [], 0.1)


def test_headline_order_and_validation():
    assert headline_for("rl_edit", HEADLINE) == ["edit/correct"]
    assert headline_for("rl_t2i_cot", HEADLINE) == ["cot/with_reasoning"]
    assert headline_for("sft", HEADLINE) == list(HEADLINE.values())
    results = {"checkpoints": {"rl_t2i": {}, "sft": {}, "rl_edit": {}}}
    assert candidate_order(results) == ["sft", "rl_t2i", "rl_edit"]
    assert candidate_order(results, ["rl_edit"]) == ["rl_edit"]
    with pytest.raises(ValueError, match="were not evaluated"):
        candidate_order(results, ["rl_reflect"])
    assert validate_results([]) == ["results must be a JSON object, got list"]
    bad = {"checkpoints": {"rl_edit": {"edit/correct": None}}, "headline": HEADLINE, "settings": {}, "paths": {}}
    assert validate_results(bad) == [
        "checkpoint 'rl_edit': headline metric edit/correct is missing or not finite (None)",
        "checkpoint 'rl_edit' has no path in results.json",
    ]


def _metrics(geneval: float, edit: float, others: float = 0.5) -> dict[str, float]:
    m = {c: others for c in TABLE_COLUMNS} | {"geneval/overall": geneval, "edit/correct": edit}
    return m | {"geneval/counting": 0.1}  # a fine-grained metric outside the guarded columns


@pytest.mark.slow
def test_run_promote_against_a_real_sqlite_registry(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    torch.set_num_threads(1)
    paths = {}
    for seed, name in enumerate(["sft", "rl_t2i", "rl_edit"]):
        model = tiny_model(tmp_path / "work", seed=seed)
        paths[name] = str(tmp_path / "models" / name)
        model.save_pretrained(paths[name])
    checkpoints = {
        "sft": _metrics(0.30, 0.20),
        "rl_t2i": _metrics(0.50, 0.17) | {"geneval/counting": 0.0},  # edit -0.03: within 0.05; counting unguarded
        "rl_edit": _metrics(0.30, 0.40),  # beats rl_t2i on edit, but geneval/overall drops 0.20
    }
    results = {"checkpoints": checkpoints, "headline": HEADLINE, "paths": paths, "columns": list(TABLE_COLUMNS),
               "settings": {"benchmarks": {"geneval": {"n_prompts": 6, "sampling": {n: {"steps": 2} for n in paths}}}}}
    (tmp_path / "results.json").write_text(json.dumps(results))
    lock = {"schema": "2.0", "stages": {"curate": {"outs": [{"path": "data/shards", "md5": "feed.dir"}]}}}
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    cfg = PromoteConfig(results_path=str(tmp_path / "results.json"), registered_model="unirl-test", tolerance=0.05,
                        dvc_lock=str(tmp_path / "dvc.lock"), decision_path=str(tmp_path / "promotion.json"))

    out = run_promote(cfg)
    assert [(d["checkpoint"], d["version"], d["alias"]) for d in out["decisions"]] == [
        ("sft", "1", "champion"), ("rl_t2i", "2", "champion"), ("rl_edit", "3", "challenger")]
    assert out["decisions"][2]["reason"] == (
        "geneval/overall regressed 0.5000 -> 0.3000 (-0.2000), beyond the tolerance 0.05")
    assert out["champion"] == {"version": "2", "checkpoint": "rl_t2i", "uri": "models:/unirl-test@champion"}
    assert json.loads((tmp_path / "promotion.json").read_text())["decisions"] == out["decisions"]

    client = mlflow.MlflowClient(tracking_uri=uri)
    assert str(client.get_model_version_by_alias("unirl-test", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("unirl-test", "challenger").version) == "3"
    v2 = client.get_model_version("unirl-test", "2")
    assert v2.tags["decision"] == "champion" and v2.tags["reason"].startswith("headline improved (geneval/overall")
    assert json.loads(v2.tags["metrics"]) == checkpoints["rl_t2i"]
    assert v2.tags["data_version"] == "feed.dir" and v2.tags["checkpoint"] == "rl_t2i"
    assert json.loads(v2.tags["config"])["profile"] == "tiny" and "git_commit" in v2.tags
    assert json.loads(v2.tags["eval_settings"]) == {"geneval": {"steps": 2}} and v2.tags["compared_to_version"] == "1"
    assert client.get_model_version("unirl-test", "1").tags["superseded_by"] == "2"
    assert len(client.search_model_versions("name='unirl-test'")) == 3

    # Re-running with the same checkpoints registers nothing new; the champion stays, sft loses to it.
    again = run_promote(cfg)
    assert [(d["checkpoint"], d["version"], d["alias"]) for d in again["decisions"]] == [
        ("sft", "1", "challenger"), ("rl_t2i", "2", "champion"), ("rl_edit", "3", "challenger")]
    assert again["decisions"][1]["reason"] == "already the champion (same weights)"
    assert len(client.search_model_versions("name='unirl-test'")) == 3
    assert str(client.get_model_version_by_alias("unirl-test", "champion").version) == "2"


def test_run_promote_refuses_bad_results(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the eval stage first"):
        run_promote(PromoteConfig(results_path=str(tmp_path / "missing.json")))
    (tmp_path / "r.json").write_text(json.dumps({"checkpoints": {}, "headline": {}, "settings": {}, "paths": {}}))
    with pytest.raises(ValueError, match="evaluated no checkpoint"):
        run_promote(PromoteConfig(results_path=str(tmp_path / "r.json")))


def test_decide_min_improvement():
    """A headline gain below ``min_improvement`` keeps the champion; exactly the margin is enough."""
    champ = {"vqa/accuracy": 0.2833, "geneval/overall": 0.25}
    ok, why = decide({"vqa/accuracy": 0.2917, "geneval/overall": 0.25}, champ, ["vqa/accuracy"], 0.05,
                     min_improvement=0.02)
    assert not ok
    assert why == "headline vqa/accuracy did not beat the champion by 0.02: 0.2917 against 0.2833 (+0.0084)"
    assert decide({"vqa/accuracy": 0.2917, "geneval/overall": 0.25}, champ, ["vqa/accuracy"], 0.05)[0]  # margin 0
    assert decide({"a": 0.52}, {"a": 0.5}, ["a"], 0.05, min_improvement=0.02)[0]  # exactly the margin
    # the margin never lets an equal or worse headline through, and a regression elsewhere still blocks
    assert not decide({"a": 0.5}, {"a": 0.5}, ["a"], 0.05, min_improvement=0.0)[0]
    ok, why = decide({"a": 0.6, "b": 0.3}, {"a": 0.5, "b": 0.5}, ["a"], 0.05, min_improvement=0.02)
    assert not ok and "b regressed" in why
    with pytest.raises(ValueError, match="min_improvement"):
        decide({"a": 1.0}, {"a": 0.0}, ["a"], 0.05, min_improvement=-0.01)
