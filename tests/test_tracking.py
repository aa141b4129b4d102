"""MLflow tracking against a real SQLite store in tmp_path: metrics, images, checkpoints as pyfunc models."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import matplotlib
import mlflow.pyfunc  # binds ``mlflow`` too
import pytest
import torch
import yaml
from _dist_worker import IN_DIM, toy_model
from PIL import Image

from unirl.config import PROJECT_ROOT
from unirl.tracking import (
    MlflowTracker,
    NullTracker,
    Tracker,
    data_version,
    flatten_params,
    git_commit,
    import_string,
    make_tracker,
    tracking_uri,
)
from unirl.train.checkpoint import save_checkpoint

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOCK = {
    "schema": "2.0",
    "stages": {
        "curate": {
            "cmd": "unirl curate",
            "deps": [{"path": "unirl/data", "hash": "md5", "md5": "aaa.dir", "size": 10, "nfiles": 3}],
            "outs": [{"path": "data/shards", "hash": "md5", "md5": "0123abcd.dir", "size": 99, "nfiles": 12}],
        },
        "sft": {
            "cmd": "unirl sft",
            "deps": [{"path": "data/shards", "hash": "md5", "md5": "0123abcd.dir"}],
            "outs": [{"path": "data/sft/model", "md5": "m1.dir"}, {"path": "data/sft/metrics.json", "md5": "m2"}],
        },
    },
}


def test_helpers(tmp_path, monkeypatch):
    lock = tmp_path / "dvc.lock"
    lock.write_text(yaml.safe_dump(LOCK))
    assert data_version(lock, "data/shards") == "0123abcd.dir"
    assert data_version(lock, "data/shards/") == "0123abcd.dir"
    assert data_version(lock, "unirl/data") == "aaa.dir"  # a dependency
    assert data_version(lock, "curate") == "0123abcd.dir"  # a stage with one output
    assert data_version(lock, "sft") == "data/sft/model:m1.dir,data/sft/metrics.json:m2"
    assert data_version(lock, "nope") is None and data_version(tmp_path / "missing.lock", "data/shards") is None

    commit = git_commit()
    assert commit is None or re.fullmatch(r"[0-9a-f]{40}", commit)
    assert git_commit(tmp_path) is None  # not a git checkout

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking_uri() == f"sqlite:///{PROJECT_ROOT / 'mlflow' / 'mlflow.db'}"
    assert MlflowTracker("e").artifact_location == (PROJECT_ROOT / "mlflow" / "artifacts" / "e").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5555")
    assert tracking_uri() == "http://127.0.0.1:5555" and MlflowTracker("e").artifact_location is None

    assert flatten_params({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": "1", "a.c": "[1, 2]", "d": "None"}
    assert import_string("unirl.tracking:flatten_params") is flatten_params
    with pytest.raises(ImportError, match="no_such_module"):
        import_string("no_such_module:f")


def test_null_tracker_mirrors_mlflow_tracker():
    public = {n for n in dir(MlflowTracker) if not n.startswith("_") and callable(getattr(MlflowTracker, n))}
    null_public = {n for n in dir(NullTracker) if not n.startswith("_") and callable(getattr(NullTracker, n))}
    assert public == null_public
    for name in public:
        assert inspect.signature(getattr(MlflowTracker, name)) == inspect.signature(getattr(NullTracker, name)), name
    null = NullTracker()
    assert isinstance(null, Tracker) and isinstance(MlflowTracker("x", uri="sqlite:///unused.db"), Tracker)
    null.start("r", {"a": 1})
    null.log_metrics({"loss": 1.0}, step=0)
    assert null.log_checkpoint("/nonexistent", 3) is None and null.run_url() is None
    assert isinstance(make_tracker("x", is_main=False), NullTracker)
    assert isinstance(make_tracker("x", enabled=False, is_main=True), NullTracker)


@pytest.mark.slow
def test_mlflow_tracker_logs_run_and_checkpoint_model(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    tracker = make_tracker("unit-sft", is_main=True)
    assert isinstance(tracker, MlflowTracker) and tracker.uri == uri
    params = {"engine": {"lr": 1e-3, "backend": "torch"}, "seed": 7}
    tracker.start("sft-test", params=params, tags={"stage": "sft"})
    try:
        for step, loss in enumerate([1.0, 0.5, 0.25]):
            tracker.log_metrics({"loss": loss, "lr/dit": 1e-3 * (step + 1), "grad_norm": torch.tensor(2.0)}, step)
        tracker.log_metrics({"grad_norm_or_nan": float("nan")}, 3)
        tracker.log_image(Image.new("RGB", (16, 16), (255, 0, 0)), "samples", step=2)
        fig, ax = plt.subplots()
        ax.plot([1.0, 0.5, 0.25])
        tracker.log_figure(fig, "loss_curve", step=2)
        plt.close(fig)
        tracker.log_dict({"a": 1}, "config.json")

        model = toy_model()
        with torch.no_grad():
            model.head_bias.fill_(0.25)  # differs from a fresh toy_model(): the loader must read the file
        ckpt = save_checkpoint(tmp_path / "run", 3, model.state_dict(), extra={"seed": 7})
        model_uri = tracker.log_checkpoint(
            ckpt, 3, seed=7, data_version="0123abcd.dir", loader="_dist_worker:load_toy_model"
        )
        default_uri = tracker.log_checkpoint(ckpt, 3, name="default-loader")
        url = tracker.run_url()
    finally:
        tracker.finish()

    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "sft-test"
    assert run.data.params["engine.lr"] == "0.001" and run.data.params["seed"] == "7"
    assert run.data.tags["stage"] == "sft" and run.data.tags["latest_checkpoint_step"] == "3"
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [
        (0, 1.0),
        (1, 0.5),
        (2, 0.25),
    ]
    assert math.isnan(client.get_metric_history(run.info.run_id, "grad_norm_or_nan")[-1].value)
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr/dit")] == pytest.approx([1e-3, 2e-3, 3e-3])
    exp = client.get_experiment(run.info.experiment_id)
    assert exp.artifact_location == (tmp_path / "artifacts" / "unit-sft").as_uri()
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.json", "figures", "images"} <= artifacts
    assert client.list_artifacts(run.info.run_id, "figures")[0].path == "figures/loss_curve_step000002.png"
    assert url == f"http://127.0.0.1:5000/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"

    logged = client.get_logged_model(model_uri.split("/")[-1])
    assert logged.tags["step"] == "3" and logged.tags["seed"] == "7" and logged.tags["data_version"] == "0123abcd.dir"
    assert logged.tags["git_commit"] == str(git_commit()) and logged.params["engine.lr"] == "0.001"
    assert logged.source_run_id == run.info.run_id

    loaded = mlflow.pyfunc.load_model(model_uri)
    wrapper = loaded.unwrap_python_model()
    files = sorted(p.name for p in Path(wrapper.checkpoint_dir).iterdir())
    assert files == ["checkpoint.json", "model.safetensors", "trainer_state.safetensors"]
    for name in files:
        assert (Path(wrapper.checkpoint_dir) / name).read_bytes() == (ckpt / name).read_bytes()
    x = torch.linspace(-1, 1, 2 * IN_DIM).reshape(2, IN_DIM)  # (2, IN_DIM)
    expected = model.eval()(x)  # (2, OUT_DIM)
    torch.testing.assert_close(torch.tensor(loaded.predict(x.tolist())), expected, rtol=0, atol=1e-6)
    assert loaded.metadata.metadata["loader"] == "_dist_worker:load_toy_model"
    assert not list(Path(wrapper.checkpoint_dir).parent.parent.rglob("*.pkl"))  # logged from code, not pickled

    plain = mlflow.pyfunc.load_model(default_uri).unwrap_python_model()  # default loader: load_checkpoint
    assert plain.model.step == 3 and torch.equal(plain.model.model_state["head_bias"], model.head_bias.detach())
    with pytest.raises(NotImplementedError, match="unirl.train.checkpoint:load_checkpoint' has no predict"):
        plain.predict(None, [[0.0] * IN_DIM])
