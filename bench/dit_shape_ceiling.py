"""How fast can the tiny DiT learn the shape at all? Oracle class labels, single objects, pixel vs latent space.

    .venv/bin/python bench/dit_shape_ceiling.py [--spaces pixel,latent] [--scales 1.0] [--steps 3000]
        [--vae data/models/vae] [--threads 1] [--dit '{"num_layers": 4}']

An upper bound for the SFT stage's single_object score (issue 3), free of the LM, the connector, the prompt
wording and the task mix: for each space and object scale it trains a fresh tiny DiT (``SanaTransformer2DModel``,
``configs/tiny.yaml``, the same softmax self-attention) on single coloured shapes rendered by the Shapes world at
32 px, with the object's class given as a learned embedding through the DiT's own caption path (cross-attention),
the SFT loss (logit-normal sigma, ``eps - x0`` target, plain MSE, 10% of captions zeroed) and AdamW.

* ``pixel``: the first tiny design, the DiT on the RGB image in [-1, 1] at patch 4 (8x8 tokens of 4x4x3 pixels);
* ``latent``: the current tiny profile, the DiT at patch 1 on the 8x8x8 latents of the autoencoder the ``vae``
  stage trained (``--vae``; run ``unirl vae`` first), decoded for judging.

``--scales`` multiplies the world's object radii (1.0 = the curated data: boxes of 6-10 px at 32 px); ``--dit``
replaces fields of the profile's DiT config (a JSON object), to compare DiT sizes.
Every ``--eval-every`` steps it prints ``swap_gap`` (relative flow-matching loss increase when the class label is
replaced by another, on fixed noise: 0 means the DiT ignores the class) and the verifier's judgement of 48 ODE
samples (20 Euler steps, the profile's shift, no CFG, 16 per class): ``one_object`` (exactly one detection) and
``correct`` (exactly one object of the asked class, GenEval's single_object rule). The last line is one JSON object
with, per space and scale, the final ``swap_gap``, ``one_object`` and ``correct``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections.abc import Iterator


@contextlib.contextmanager
def object_scale(scale: float) -> Iterator[None]:
    """Temporarily multiply the Shapes world's named object radii by ``scale``."""
    from unirl.data import shapes

    saved = dict(shapes.SIZES)
    shapes.SIZES.update({k: v * scale for k, v in saved.items()})
    try:
        yield
    finally:
        shapes.SIZES.update(saved)


def single_objects(rng: random.Random, n: int, resolution: int, classes: list[int] | None = None):
    """``n`` one-object scenes as (images (n, 3, R, R) in [-1, 1], class ids (n,))."""
    import numpy as np
    import torch

    from unirl.data.shapes import COLORS, SHAPES, SIZES, place, render

    ids = classes if classes is not None else [rng.randrange(len(SHAPES)) for _ in range(n)]
    xs = []
    for k in ids:
        scene = place(rng, [(SHAPES[k], rng.choice(COLORS), rng.choice(tuple(SIZES)))])
        img = np.asarray(render(scene, resolution), dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
        xs.append(torch.from_numpy(img).permute(2, 0, 1))
    return torch.stack(xs), torch.tensor(ids)  # (n, 3, R, R), (n,)


# The first tiny design (pixel space): the DiT config of configs/tiny.yaml with these fields replaced.
PIXEL_DIT = {"in_channels": 3, "out_channels": 3, "sample_size": 32, "patch_size": 4}


class ClassDiT:
    """A fresh tiny DiT conditioned on a learned class embedding through its caption path, in pixel or latent space.

    ``vae`` (an ``AutoencoderDC``, latent space only) maps images to the DiT's latents and back.
    """

    def __init__(self, seed: int, vae=None, dit_override: dict | None = None) -> None:
        import torch
        from diffusers import SanaTransformer2DModel

        from unirl.data.shapes import SHAPES
        from unirl.models.config import load_model_config
        from unirl.models.scheduler import FlowMatchEulerScheduler
        from unirl.models.unified import set_dit_self_attention

        cfg = load_model_config("tiny")
        torch.manual_seed(seed)
        self.vae = vae
        dit = {**cfg.dit.config, **(dit_override or {})}
        self.dit = SanaTransformer2DModel(**(dit if vae is not None else {**dit, **PIXEL_DIT}))
        set_dit_self_attention(self.dit, cfg.dit_self_attention)
        self.emb = torch.nn.Embedding(len(SHAPES), self.dit.config.caption_channels)
        torch.nn.init.normal_(self.emb.weight, std=1.0)
        self.scheduler = FlowMatchEulerScheduler(cfg.sampling.shift)
        self.resolution = cfg.resolution

    def parameters(self) -> list:
        return [*self.dit.parameters(), *self.emb.parameters()]

    def encode(self, images):
        """Images (B, 3, R, R) in [-1, 1] -> what the DiT denoises (B, C, h, w)."""
        import torch

        if self.vae is None:
            return images
        with torch.no_grad():
            return self.vae.encode(images).latent * self.vae.config.scaling_factor

    def decode(self, x):
        """The DiT's sample -> images (B, 3, R, R)."""
        return x if self.vae is None else self.vae.decode(x / self.vae.config.scaling_factor).sample

    def velocity(self, x, sigma, y, keep=None):
        h = self.emb(y)[:, None]  # (B, 1, D_caption)
        if keep is not None:
            h = h * keep.view(-1, 1, 1)
        return self.dit(hidden_states=x, encoder_hidden_states=h, timestep=self.scheduler.timestep(sigma),
                        return_dict=False)[0]


def fm_loss(model: ClassDiT, x0, y, generator=None, keep=None):
    """The SFT flow-matching loss on latents ``x0``: logit-normal sigma, ``x_s = (1 - s) x0 + s eps``, MSE to
    ``eps - x0``."""
    import torch
    import torch.nn.functional as F

    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=generator))  # (B,)
    eps = torch.randn(x0.shape, generator=generator)  # (B, C, R, R)
    return F.mse_loss(model.velocity(model.scheduler.add_noise(x0, eps, sigma), sigma, y, keep), eps - x0)


def evaluate(model: ClassDiT, seed: int) -> dict[str, float]:
    import torch
    from PIL import Image

    from unirl.data import verifier
    from unirl.data.shapes import SHAPES

    rng = random.Random(seed)
    with torch.no_grad():
        x0, y = single_objects(rng, 96, model.resolution)
        x0 = model.encode(x0)  # (96, C, h, w)
        right = float(fm_loss(model, x0, y, torch.Generator().manual_seed(seed)))
        other = float(fm_loss(model, x0, (y + 1) % len(SHAPES), torch.Generator().manual_seed(seed)))
        g = torch.Generator().manual_seed(seed)
        y = torch.arange(48) % len(SHAPES)  # (48,)
        x = torch.randn(48, *x0.shape[1:], generator=g)  # (48, C, h, w)
        sig = model.scheduler.sigmas(20)  # (21,) shifted, as the tiny profile samples
        for k in range(20):
            x = model.scheduler.step(x, model.velocity(x, sig[k].expand(48), y), sig[k], sig[k + 1])
        img = model.decode(x)  # (48, 3, R, R)
        pix = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (48, R, R, 3)
    one = correct = 0
    for img, k in zip(pix, y.tolist(), strict=True):
        dets = verifier.detect(Image.fromarray(img))
        one += len(dets) == 1
        cls = SHAPES[k]
        md = {"tag": "single_object", "include": [{"class": cls, "count": 1}], "prompt": f"a photo of a {cls}"}
        correct += bool(verifier.evaluate(dets, md)["correct"])
    return {"swap_gap": other / right - 1, "one_object": one / 48, "correct": correct / 48}


def run_scale(scale: float, steps: int, batch: int, lr: float, eval_every: int, seed: int,
              vae=None, dit_override: dict | None = None) -> dict[str, float]:
    """Train and judge one oracle DiT at one object scale; ``vae`` None = pixel space; ``dit_override``: DiT config
    fields replaced."""
    import torch

    from unirl.progress import progress_bar

    rng = random.Random(seed)
    space = "pixel" if vae is None else "latent"
    with object_scale(scale):
        model = ClassDiT(seed, vae, dit_override)
        params = model.parameters()
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        t0, res = time.perf_counter(), {}
        for step in progress_bar(range(1, steps + 1), desc=f"{space} scale {scale}"):
            x0, y = single_objects(rng, batch, model.resolution)
            x0 = model.encode(x0)  # (B, C, h, w)
            keep = (torch.rand(batch) >= 0.1).float()  # (B,) 10% zeroed captions, as the SFT dropout
            loss = fm_loss(model, x0, y, keep=keep)
            if not torch.isfinite(loss):
                raise SystemExit(f"scale {scale}: non-finite loss at step {step}")
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % eval_every == 0 or step == steps:
                res = evaluate(model, seed=1000 + seed)
                print(f"{space} scale {scale:.2f} step {step:5d} {time.perf_counter() - t0:6.0f}s "
                      f"loss {loss.item():.4f} "
                      f"swap_gap {res['swap_gap']:+.4f} one_object {res['one_object']:.2f} "
                      f"correct {res['correct']:.3f}", flush=True)
    return {k: round(v, 4) for k, v in res.items()}


def _json_object(text: str) -> dict:
    """argparse type of ``--dit``: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"not a JSON object of DiT config fields: {text!r}")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spaces", default="pixel,latent", help="pixel and/or latent (the vae stage's autoencoder)")
    ap.add_argument("--scales", default="1.0", help="object radius multipliers (1.0 = the curated world)")
    ap.add_argument("--vae", default="data/models/vae", help="autoencoder directory written by the vae stage")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dit", type=_json_object, default={},
                    help='DiT config fields to replace, as JSON (e.g. \'{"num_layers": 4}\')')
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    scales = [float(s) for s in args.scales.split(",")]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for space in args.spaces.split(","):
        vae = None
        if space == "latent":
            from pathlib import Path

            from diffusers import AutoencoderDC

            if not (Path(args.vae) / "config.json").is_file():
                raise SystemExit(f"no autoencoder at {args.vae}: run the vae stage first (unirl vae), pass --vae, "
                                 "or use --spaces pixel")
            vae = AutoencoderDC.from_pretrained(args.vae).eval().requires_grad_(False)
        elif space != "pixel":
            raise SystemExit(f"--spaces takes pixel and/or latent, got {space!r}")
        out[space] = {f"{s:g}": run_scale(s, args.steps, args.batch, args.lr, args.eval_every, args.seed, vae,
                                          args.dit) for s in scales}
    print(f"{'space':>6} {'scale':>6} {'swap_gap':>9} {'one_object':>11} {'correct':>8}   "
          f"({args.steps} steps, batch {args.batch})")
    for space, per_scale in out.items():
        for s, r in per_scale.items():
            print(f"{space:>6} {s:>6} {r['swap_gap']:+9.4f} {r['one_object']:11.2f} {r['correct']:8.3f}")
    print(json.dumps({"steps": args.steps, "batch": args.batch, "dit": args.dit, "spaces": out}))


if __name__ == "__main__":
    main()
