"""The vae stage: a short real training run, what it writes and logs, SFT loading it, and its errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, small_params
from unirl.config import load_config
from unirl.data.curate import CurateConfig, curate
from unirl.models import UnifiedModel, load_model_config
from unirl.models.tiny import tiny_tokenizer
from unirl.train.vae import VAEStageConfig, load_images, reconstruction_metrics, train_vae, with_trained_vae


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("vae")
    cur = load_config(CurateConfig, "curate", small_params(tmp, per_tag=6))
    curate(cur, progress=False)
    return Path(cur.out_dir)


def _cfg(shards: Path, out: Path, **kw) -> VAEStageConfig:
    base = dict(shards_dir=str(shards), out_dir=str(out / "vae"), metrics_path=str(out / "vae.json"),
                grid_path=str(out / "recon.png"), steps=40, decoder_steps=0, batch_size=8, eval_images=16,
                min_verifier_agreement=0.0, tracking=False, progress=False, torch_threads=1)
    base.update(kw)
    return VAEStageConfig(**base)


def test_vae_stage_trains_logs_and_sft_builds_on_it(shards: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = _cfg(shards, tmp_path, tracking=True, experiment="vae-test")
    metrics = train_vae(cfg)
    # outputs: safetensors weights + config with the latent scaling, metrics JSON, the reconstruction grid
    out = Path(cfg.out_dir)
    weights = load_file(out / "diffusion_pytorch_model.safetensors")
    config = json.loads((out / "config.json").read_text())
    assert config["scaling_factor"] == pytest.approx(1.0 / metrics["latent_std"], rel=1e-6)
    assert json.loads(Path(cfg.metrics_path).read_text())["psnr"] == pytest.approx(metrics["psnr"])
    assert 0.0 <= metrics["verifier_agreement"] <= 1.0 and metrics["mse"] > 0
    assert Path(cfg.grid_path).stat().st_size > 0
    # MLflow: the loss every step (and it fell), the autoencoder logged as a model at its step
    client = mlflow.tracking.MlflowClient()
    exp = client.get_experiment_by_name("vae-test")
    (run,) = client.search_runs([exp.experiment_id])
    hist = [m.value for m in client.get_metric_history(run.info.run_id, "loss/mse")]
    assert len(hist) == cfg.steps and sum(hist[-5:]) < sum(hist[:5])
    (model,) = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert model.name == "vae" and model.tags["step"] == str(cfg.steps)
    # SFT's model config loads these weights (frozen); latents come out at unit scale
    mcfg = with_trained_vae(load_model_config("tiny"), cfg.out_dir)
    unified = UnifiedModel.build(mcfg, tiny_tokenizer(tmp_path / "tok"))
    for name, value in unified.vae.state_dict().items():
        torch.testing.assert_close(value, weights[name], rtol=0, atol=0)
    assert not any(p.requires_grad for p in unified.vae.parameters())
    images = load_images(cfg.shards_dir, "train", 32)
    from PIL import Image

    pil = [Image.fromarray(((x.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()) for x in images[:64]]
    lat = unified.encode_images(pil)  # (64, 8, 8, 8)
    assert lat.shape == (64, *unified.latent_shape) == (64, 8, 8, 8)
    assert 0.7 < float(lat.std()) < 1.4


def test_decoder_phase_moves_only_the_decoder(shards: Path, tmp_path: Path, monkeypatch) -> None:
    """The decoder-only phase leaves the latent space SFT trains on (encoder, scaling factor) bit-identical."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    plain = _cfg(shards, tmp_path / "plain", steps=20)
    two = _cfg(shards, tmp_path / "two", steps=20, decoder_steps=15, decoder_latent_noise=0.6, tracking=True,
               experiment="vae-decoder")
    m_plain, m_two = train_vae(plain), train_vae(two)
    a = load_file(Path(plain.out_dir) / "diffusion_pytorch_model.safetensors")
    b = load_file(Path(two.out_dir) / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        if name.startswith("encoder."):
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert any(not torch.equal(a[n], b[n]) for n in a if n.startswith("decoder."))
    assert m_two["latent_std"] == m_plain["latent_std"]
    cfg_a, cfg_b = (json.loads((Path(c.out_dir) / "config.json").read_text()) for c in (plain, two))
    assert cfg_a["scaling_factor"] == cfg_b["scaling_factor"]
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("vae-decoder").experiment_id])
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/decoder_mse")]
    assert steps == list(range(21, 36))  # logged after the 20 joint steps, one per decoder step
    with pytest.raises(ValueError, match="decoder_steps >= 0"):
        train_vae(dataclasses.replace(plain, decoder_steps=-1))


def test_identity_reconstruction_scores_perfectly(shards: Path) -> None:
    class Identity(torch.nn.Module):
        def encode(self, x):
            return type("E", (), {"latent": x})()

        def decode(self, z):
            return type("D", (), {"sample": z})()

    x = load_images(shards, "val", 32)[:8]
    m = reconstruction_metrics(Identity(), x)
    assert m["mse"] == 0.0 and m["verifier_agreement"] == 1.0


def test_errors_name_the_problem(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run the vae stage first"):
        with_trained_vae(load_model_config("tiny"), str(tmp_path / "nope"))
    # a reconstruction worse than the floor fails the stage but keeps the autoencoder for inspection
    cfg = _cfg(shards, tmp_path, steps=1, min_verifier_agreement=1.0)
    with pytest.raises(RuntimeError, match="read as their original.*vae.steps=1"):
        train_vae(cfg)
    assert (Path(cfg.out_dir) / "config.json").is_file()
    # a pixel-space profile has nothing to train
    profile = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    profile["vae"] = {"path": None, "config": {}}
    path = tmp_path / "pixel.yaml"
    path.write_text(yaml.safe_dump(profile))
    with pytest.raises(ValueError, match="pixel space"):
        train_vae(dataclasses.replace(cfg, profile=str(path)))
    with pytest.raises(ValueError, match="must be >= 1"):
        train_vae(dataclasses.replace(cfg, steps=0))
