"""The ``vae`` stage: train the tiny profile's DC-AE (diffusers ``AutoencoderDC``) on the curated images.

Profiles whose ``vae`` is given by ``config`` (no pretrained ``path``) get their autoencoder here, before SFT; the
DiT then denoises its latents instead of pixels. Why the tiny profile has one: in pixel space (32 px, patch 4) the
tiny DiT did not learn the class of 6-10 px shapes within the SFT budget, even with oracle class labels
(``bench/dit_shape_ceiling.py``); on this autoencoder's 8x8x8 latents the same DiT does (docs/results.md, "Why the tiny
profile has a VAE").

Variant, against DC-AE (Chen et al., 2024):

* the same deterministic autoencoder class (no KL term, space-to-channel shortcuts), ResBlocks only, f4;
* trained with pixel MSE alone: the paper's later phases add LPIPS and a GAN loss for fine texture, which flat-
  coloured 32 px scenes do not have (``verifier_agreement`` measures what matters here: the Shapes verifier reads
  the reconstruction as it reads the original);
* Gaussian noise of ``latent_noise`` x the batch's latent std is added to the latents before decoding (not in the
  paper), so the decoder tolerates the small errors of the DiT's latents;
* then a decoder-only phase (not in the paper): ``decoder_steps`` more steps with the encoder frozen (so the latent
  space and ``scaling_factor`` the DiT learns on are final after the first phase) and ``decoder_latent_noise``
  (0.6) x the latent std. Decoding the SFT model's own latents, this decoder raised held-out GenEval `correct` by
  0.02-0.05 on val and test (0.1 as before: no change; 1.0: clean reconstructions start to blur; docs/results.md, SFT);
* after training, ``scaling_factor`` = 1 / std of the train latents (SANA's convention: the DiT sees
  ``latent * scaling_factor``).

Data: the train split's t2i images and edit sources and targets; the val split for the metrics.
Outputs: ``save_pretrained(out_dir)`` (safetensors + config.json, written atomically), metrics JSON, an
original-vs-reconstruction grid; an MLflow run with the loss every step and the autoencoder logged as a model.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC
from PIL import Image

from unirl.atomic import atomic_write_json, staged_dir
from unirl.config import option, to_dict
from unirl.data import verifier
from unirl.eval.grid import make_grid, save_image_atomic
from unirl.models.config import ModelConfig, load_model_config
from unirl.progress import progress_bar
from unirl.tracking import data_version, make_tracker
from unirl.train.engine import EngineConfig, lr_factor
from unirl.train.sft_data import read_split

__all__ = ["VAEStageConfig", "load_images", "load_vae", "reconstruction_metrics", "train_vae", "with_trained_vae"]


@dataclass
class VAEStageConfig:
    """The ``vae`` stage (``params.yaml`` section ``vae``)."""

    profile: str = option("tiny", "model profile: configs/<profile>.yaml (its vae.config is the architecture)")
    shards_dir: str = option("data/shards", "curated task shards (output of the curate stage)")
    out_dir: str = option("data/models/vae", "trained autoencoder (diffusers save_pretrained: safetensors + config)")
    metrics_path: str = option("data/metrics/vae.json", "reconstruction metrics on the val split (JSON)")
    grid_path: str = option("data/plots/vae_recon.png", "val originals (top rows) over their reconstructions")
    steps: int = option(1200, "optimiser steps")
    batch_size: int = option(32, "images per step")
    lr: float = option(1e-3, "AdamW learning rate (cosine decay to 10%)")
    latent_noise: float = option(0.1, "std of the noise added to the latents before decoding, x the batch latent std")
    decoder_steps: int = option(600, "then train the decoder alone (encoder, latent space and scaling frozen) for "
                                     "this many steps; 0 = off")
    decoder_latent_noise: float = option(0.6, "latent noise of the decoder-only phase, x the batch latent std: a "
                                              "decoder that maps imprecise (DiT) latents onto clean shapes")
    decoder_lr: float = option(3e-4, "AdamW learning rate of the decoder-only phase (constant)")
    seed: int = option(0, "seed of the init, the batch order and the noise")
    torch_threads: int = option(2, "torch intra-op threads (0 = torch's default)")
    max_bad_fraction: float = option(0.0, "tolerated share of unreadable samples per shard set")
    eval_images: int = option(256, "val images scored by the metrics")
    min_verifier_agreement: float = option(0.95, "fail the stage when fewer val reconstructions than this read "
                                                 "as their original under the verifier")
    tracking: bool = option(True, "log to MLflow")
    experiment: str = option("vae", "MLflow experiment name")
    progress: bool = option(True, "tqdm progress bar")


def load_images(shards_dir: str | Path, split: str, resolution: int, max_bad_fraction: float = 0.0) -> torch.Tensor:
    """The t2i images and edit sources/targets of ``split`` as a tensor (N, 3, R, R) in [-1, 1]."""
    ims: list[Image.Image] = [s.images["png"] for s in read_split(shards_dir, "t2i", split, max_bad_fraction,
                                                                   resolution)]
    if (Path(shards_dir) / "edit").is_dir():
        for s in read_split(shards_dir, "edit", split, max_bad_fraction, resolution):
            ims += [s.images["src.png"], s.images["tgt.png"]]
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in ims])  # (N, R, R, 3)
    return torch.from_numpy(arr).permute(0, 3, 1, 2) / 127.5 - 1.0  # (N, 3, R, R)


def _to_pil(x: torch.Tensor) -> list[Image.Image]:
    pix = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (B, R, R, 3)
    return [Image.fromarray(a) for a in pix]


def _reads_same(a: list[verifier.Detection], b: list[verifier.Detection]) -> bool:
    return sorted((d.cls, d.color) for d in a) == sorted((d.cls, d.color) for d in b)


@torch.no_grad()
def _reconstruct(vae: AutoencoderDC, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.decode(vae.encode(x[i:i + 64]).latent).sample for i in range(0, len(x), 64)])  # (N,3,R,R)


def _metrics(x: torch.Tensor, rec: torch.Tensor) -> dict[str, float]:
    mse = float(F.mse_loss(rec.clamp(-1, 1), x))
    same = [_reads_same(verifier.detect(a), verifier.detect(b)) for a, b in zip(_to_pil(x), _to_pil(rec),
                                                                                 strict=True)]
    return {"mse": mse, "psnr": float(10 * np.log10(4.0 / max(mse, 1e-12))),
            "verifier_agreement": float(np.mean(same))}


def reconstruction_metrics(vae: AutoencoderDC, x: torch.Tensor) -> dict[str, float]:
    """MSE, PSNR (dB, pixels in [-1, 1]) and the share of images the verifier reads alike before and after."""
    return _metrics(x, _reconstruct(vae, x))


def _report(vae: AutoencoderDC, val: torch.Tensor, grid_path: str) -> tuple[dict[str, float], Image.Image]:
    """Reconstruct ``val`` once: its metrics, and the grid of 8 originals over their reconstructions (saved)."""
    rec = _reconstruct(vae, val)  # (N, 3, R, R)
    grid = make_grid([*_to_pil(val[:8]), *_to_pil(rec[:8])], cols=8)
    save_image_atomic(grid, grid_path)
    return _metrics(val, rec), grid


def with_trained_vae(mcfg: ModelConfig, vae_dir: str) -> ModelConfig:
    """``mcfg`` whose trainable-by-the-pipeline VAE (a ``config``, no ``path``) loads from ``vae_dir``.

    Pixel-space profiles and profiles with a pretrained ``vae.path`` are returned unchanged; ``vae_dir=''`` keeps
    the randomly initialised autoencoder (tests and smoke runs only: its latents carry no image structure).
    """
    if mcfg.vae.path or not mcfg.vae.config or not vae_dir:
        return mcfg
    if not (Path(vae_dir) / "config.json").is_file():
        raise FileNotFoundError(f"no trained autoencoder at {vae_dir} (config.json missing): profile "
                                f"{mcfg.profile!r} needs one; run the vae stage first (unirl vae / dvc repro vae)")
    return dataclasses.replace(mcfg, vae=dataclasses.replace(mcfg.vae, path=str(vae_dir)))


def load_vae(path: str | os.PathLike) -> AutoencoderDC:
    """The autoencoder a ``vae`` stage wrote (the MLflow pyfunc loader of its logged model)."""
    return AutoencoderDC.from_pretrained(path).eval()


def train_vae(cfg: VAEStageConfig) -> dict[str, Any]:
    """Train the profile's autoencoder on the curated train images, save it, score it on val; return metrics."""
    mcfg = load_model_config(cfg.profile)
    if mcfg.vae.pixel_space:
        raise ValueError(f"profile {cfg.profile!r} is in pixel space (vae.path and vae.config empty): it has no "
                         "autoencoder to train; drop the vae stage or give the profile a vae.config")
    if mcfg.vae.path:
        return _score_pretrained(cfg, mcfg)
    if cfg.steps < 1 or cfg.batch_size < 1 or cfg.decoder_steps < 0:
        raise ValueError(f"vae.steps and vae.batch_size must be >= 1 and vae.decoder_steps >= 0, got {cfg.steps}, "
                         f"{cfg.batch_size} and {cfg.decoder_steps}")
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    t0 = time.time()
    train = load_images(cfg.shards_dir, "train", mcfg.resolution, cfg.max_bad_fraction)
    val = load_images(cfg.shards_dir, "val", mcfg.resolution, cfg.max_bad_fraction)[:cfg.eval_images]
    torch.manual_seed(cfg.seed)
    vae = AutoencoderDC(**{**mcfg.vae.config, "scaling_factor": 1.0})
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.seed)
    schedule = EngineConfig(schedule="cosine", total_steps=cfg.steps, min_lr_ratio=0.1)
    tracker = make_tracker(cfg.experiment, enabled=cfg.tracking, is_main=True)
    dversion = data_version("dvc.lock", cfg.shards_dir)
    tracker.start("vae", params=to_dict(cfg), tags={"seed": str(cfg.seed), "data_version": str(dversion)})
    status = "FAILED"
    try:
        bar = progress_bar(total=cfg.steps + cfg.decoder_steps, desc="vae", unit="step", disable=not cfg.progress)
        fit = functools.partial(_fit, vae, train, cfg.batch_size, gen, tracker, bar)
        fit(opt, range(cfg.steps), cfg.latent_noise, lambda step: cfg.lr * lr_factor(schedule, step), "mse", "vae.lr")
        vae.eval()
        with torch.no_grad():
            z = torch.cat([vae.encode(train[i:i + 256]).latent for i in range(0, len(train), 256)])  # (N, C, h, w)
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        if cfg.decoder_steps > 0:  # the latent space is final: only the decoder moves from here on
            vae.encoder.requires_grad_(False)
            vae.decoder.train()
            dec_opt = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.decoder_lr, weight_decay=0.0)
            fit(dec_opt, range(cfg.steps, cfg.steps + cfg.decoder_steps), cfg.decoder_latent_noise,
                lambda step: cfg.decoder_lr, "decoder_mse", "vae.decoder_lr")
        vae.eval().requires_grad_(False)
        bar.close()
        metrics, grid = _report(vae, val, cfg.grid_path)
        metrics.update(latent_std=float(z.std()), latent_mean=float(z.mean()), train_images=len(train),
                       minutes=(time.time() - t0) / 60)
        with staged_dir(cfg.out_dir) as tmp:  # atomic: save_pretrained into a temp dir, then swap it in
            vae.save_pretrained(tmp, safe_serialization=True)
        last = cfg.steps + cfg.decoder_steps
        tracker.log_metrics({f"val/{k}": float(v) for k, v in metrics.items()}, step=last)
        tracker.log_image(grid, "reconstructions", last)
        tracker.log_checkpoint(cfg.out_dir, last, seed=cfg.seed, data_version=dversion, params=to_dict(cfg),
                               loader="unirl.train.vae:load_vae", name="vae")
        metrics["run_url"] = tracker.run_url()
        atomic_write_json(cfg.metrics_path, metrics)
        if metrics["verifier_agreement"] < cfg.min_verifier_agreement:
            raise RuntimeError(f"vae: only {metrics['verifier_agreement']:.3f} of val reconstructions read as their "
                               f"original (vae.min_verifier_agreement={cfg.min_verifier_agreement}); train longer "
                               f"(vae.steps={cfg.steps}) or widen vae.config in configs/{cfg.profile}.yaml. The "
                               f"autoencoder was kept at {cfg.out_dir} for inspection")
        status = "FINISHED"
        return metrics
    finally:
        tracker.finish(status)


def _fit(vae: AutoencoderDC, train: torch.Tensor, batch_size: int, gen: torch.Generator, tracker: Any, bar: Any,
         opt: torch.optim.Optimizer, steps: range, noise: float, lr_at: Callable[[int], float], name: str,
         lr_key: str) -> None:
    """Reconstruction steps ``steps`` (global indices) with ``opt``: decode the latents plus ``noise`` x their std."""
    for step in steps:
        x = train[torch.randint(len(train), (batch_size,), generator=gen)]  # (B, 3, R, R)
        z = vae.encode(x).latent  # (B, C, R/f, R/f)
        z = z + noise * z.detach().std() * torch.randn(z.shape, generator=gen)
        loss = F.mse_loss(vae.decode(z).sample, x)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"vae: non-finite reconstruction loss at step {step + 1}; lower {lr_key} "
                                     f"(now {lr_at(step)})")
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tracker.log_metrics({f"loss/{name}": float(loss.detach()), "lr": opt.param_groups[0]["lr"]}, step=step + 1)
        bar.update(1)
        bar.set_postfix({name: f"{float(loss.detach()):.5f}"})


def _score_pretrained(cfg: VAEStageConfig, mcfg: ModelConfig) -> dict[str, Any]:
    """A profile with a pretrained DC-AE (``vae.path``): nothing to train; score it on the curated val images.

    ``out_dir`` then holds only ``pretrained.json`` naming the path (SFT loads the profile's ``vae.path``).
    """
    if not Path(mcfg.vae.path).is_dir():
        raise FileNotFoundError(f"profile {cfg.profile!r} vae.path {mcfg.vae.path} does not exist; put the DC-AE "
                                "checkpoint there (nothing is fetched at run time)")
    vae = load_vae(mcfg.vae.path).requires_grad_(False)
    val = load_images(cfg.shards_dir, "val", mcfg.resolution, cfg.max_bad_fraction)[:cfg.eval_images]
    metrics: dict[str, Any] = {**_report(vae, val, cfg.grid_path)[0], "pretrained": str(mcfg.vae.path)}
    atomic_write_json(Path(cfg.out_dir) / "pretrained.json", {"path": str(mcfg.vae.path)})
    atomic_write_json(cfg.metrics_path, metrics)
    return metrics
