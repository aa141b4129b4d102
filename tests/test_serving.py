"""Serving: the registered champion answers over HTTP from a real `mlflow models serve` process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
import torch
from PIL import Image

from unirl.serving import ImageGenerator, decode_png_b64, encode_png_b64, log_serving_model, request_json
from unirl.tracking import MlflowTracker

pytestmark = pytest.mark.slow
WAIT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from unirl.models.tiny import tiny_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("serve")
    model = tiny_model(root / "work", seed=0)
    model.save_pretrained(root / "ckpt")
    return root / "ckpt", model


def test_image_generator_predict(checkpoint):
    path, model = checkpoint
    gen = ImageGenerator(model)
    src = Image.new("RGB", (32, 32), (255, 255, 255))
    df = pd.DataFrame([{"prompt": "a photo of a red circle"},
                       {"prompt": "unused", "image": encode_png_b64(src), "instruction": "add a blue square"},
                       {"prompt": "a photo of a green square", "image": None}])
    out = gen.predict(df, {"steps": 2, "seed": 5})
    assert list(out.columns) == ["image"] and len(out) == 3
    images = [decode_png_b64(x) for x in out["image"]]
    assert all(im.size == (32, 32) and im.mode == "RGB" for im in images)
    # Row i uses sample_seed(seed, i): the t2i row equals the model's own sampler with that seed.
    own = model.generate_images(["a photo of a red circle"], steps=2, seed=5 * 1_000_003 + 0)[0]
    assert np.abs(np.asarray(own, np.int16) - np.asarray(images[0], np.int16)).max() <= 1
    # the same request gives the same bytes; a row alone gives its image within float rounding of the batch shape
    # (in the request above it shares a padded LM batch with row 2)
    assert gen.predict(df, {"steps": 2, "seed": 5})["image"].tolist() == out["image"].tolist()
    alone = decode_png_b64(gen.predict(df.iloc[:1], {"steps": 2, "seed": 5})["image"][0])
    assert np.abs(np.asarray(alone, np.int16) - np.asarray(images[0], np.int16)).max() <= 1
    with pytest.raises(ValueError, match="'prompt' column"):
        gen.predict(pd.DataFrame([{"text": "x"}]))
    with pytest.raises(ValueError, match="unknown param"):
        gen.predict(df.iloc[:1], {"stepz": 2})
    with pytest.raises(ValueError, match="base64-encoded PNG"):
        gen.predict(pd.DataFrame([{"prompt": "x", "image": "not-base64!"}]), {"steps": 1})


def test_mlflow_models_serve_answers_over_http(checkpoint, tmp_path):
    path, _ = checkpoint
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert mlflow.active_run() is None
    with pytest.raises(RuntimeError, match="active MLflow run"):
        log_serving_model(path, "serving")
    tracker = MlflowTracker("serve-test", uri=uri)
    tracker.start("log")
    try:
        info = log_serving_model(path, "serving")
    finally:
        tracker.finish()
    client = mlflow.MlflowClient(tracking_uri=uri)
    version = mlflow.register_model(info.model_uri, "unirl-serve")
    client.set_registered_model_alias("unirl-serve", "champion", version.version)

    port = _free_port()
    bindir = Path(sys.executable).parent  # the server execs `uvicorn` from PATH: this environment's first
    env = os.environ | {"MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1",
                        "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    mlflow_bin = bindir / "mlflow"
    log_file = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed in finally
    proc = subprocess.Popen(
        [str(mlflow_bin), "models", "serve", "-m", "models:/unirl-serve@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            if proc.poll() is not None:
                log = (tmp_path / "serve.log").read_text()
                pytest.fail(f"mlflow models serve exited with {proc.returncode}:\n{log}")
            try:
                if requests.get(f"{base}/ping", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no /ping answer within {WAIT_S}s:\n{(tmp_path / 'serve.log').read_text()}")
            time.sleep(0.5)
        body = json.loads(request_json(["a photo of a red circle"], steps=2))
        assert body == {"dataframe_records": [{"prompt": "a photo of a red circle"}], "params": {"steps": 2}}
        r = requests.post(f"{base}/invocations", json={"dataframe_records": [{"prompt": "a photo of a red circle"}]},
                          timeout=WAIT_S)
        assert r.status_code == 200, r.text
        predictions = r.json()["predictions"]
        assert len(predictions) == 1
        image = decode_png_b64(predictions[0]["image"])
        assert image.size == (32, 32)
        r = requests.post(f"{base}/invocations", data=request_json(["a photo of two blue squares"], steps=2),
                          headers={"Content-Type": "application/json"}, timeout=WAIT_S)
        assert r.status_code == 200, r.text
        assert decode_png_b64(r.json()["predictions"][0]["image"]).size == (32, 32)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker: one process group
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        log_file.close()
