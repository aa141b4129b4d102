"""bench/dit_shape_ceiling.py: its data are what it claims (scaled, verifier-readable) and one short run works."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from PIL import Image

from unirl.data.shapes import SHAPES, SIZES
from unirl.data.verifier import detect


def test_object_scale_scales_and_restores_the_world_sizes(load_bench):
    bench, before = load_bench("dit_shape_ceiling"), dict(SIZES)
    with bench.object_scale(2.0):
        assert SIZES == {k: 2 * v for k, v in before.items()}
    assert SIZES == before
    with pytest.raises(RuntimeError), bench.object_scale(1.5):
        raise RuntimeError("boom")
    assert SIZES == before


@pytest.mark.parametrize("scale", [1.0, 2.2])
def test_single_objects_are_scaled_renders_the_verifier_reads_back(scale, load_bench):
    bench = load_bench("dit_shape_ceiling")
    with bench.object_scale(scale):
        x, y = bench.single_objects(random.Random(0), 24, 32, classes=[i % 3 for i in range(24)])
    assert x.shape == (24, 3, 32, 32) and y.tolist() == [i % 3 for i in range(24)]
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    fg_fraction = []
    for img, k in zip(x, y.tolist(), strict=True):
        pix = ((img.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)  # (32, 32, 3)
        dets = detect(Image.fromarray(pix))
        assert [d.cls for d in dets] == [SHAPES[k]]
        fg_fraction.append(float((pix < 250).any(-1).mean()))
    # area grows with the square of the scale (1.0: boxes of 6-10 px)
    assert (0.02 < np.mean(fg_fraction) < 0.08) if scale == 1.0 else (np.mean(fg_fraction) > 0.15)


@pytest.mark.parametrize("space", ["pixel", "latent"])
def test_a_short_run_reports_finite_figures(space, capsys, load_bench):
    from diffusers import AutoencoderDC

    from unirl.models.config import load_model_config

    bench = load_bench("dit_shape_ceiling")
    vae = AutoencoderDC(**load_model_config("tiny").vae.config).eval() if space == "latent" else None
    res = bench.run_scale(1.0, steps=3, batch=4, lr=5e-4, eval_every=3, seed=0, vae=vae)
    assert set(res) == {"swap_gap", "one_object", "correct"}
    assert math.isfinite(res["swap_gap"])
    assert 0 <= res["correct"] <= 1 and 0 <= res["one_object"] <= 1
    assert f"{space} scale 1.00 step     3" in capsys.readouterr().out


def test_dit_override_replaces_config_fields(load_bench):
    bench = load_bench("dit_shape_ceiling")
    model = bench.ClassDiT(0, None, {"num_layers": 1})
    assert len(model.dit.transformer_blocks) == 1 and model.dit.config.in_channels == 3  # pixel space kept
    assert len(bench.ClassDiT(0, None).dit.transformer_blocks) == 8  # configs/tiny.yaml
