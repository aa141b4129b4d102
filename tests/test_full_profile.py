"""The full profile's architecture, built on PyTorch's meta device (no weights, no memory), against published sizes.

Published sizes and what this build counts:

* Qwen2.5-VL-3B-Instruct, "3.75B" parameters (model card; embeddings tied to the LM head): counted
  3,754,622,976, of which the vision tower (ViT + merger) is 668,684,288 (the technical report's ~0.67B ViT);
* SANA-1.6B (Sana_1600M_1024px transformer), "1.6B": counted 1,604,462,752;
* DC-AE f32c32 (SANA's autoencoder), "0.3B": counted 312,250,275.

Tolerance: 0.5 % of the published figure for the LM and the DiT (a wrong layer count, width or head layout moves
them by >= ~2 %); the published "0.3B" of DC-AE is rounded to one digit, so it is checked to 0.3B +- 0.05B. The
connector (12 blocks at the LM width 2048) and the queries (2 x 256 x 2048) are ours and are checked against their
closed-form counts.
"""

from __future__ import annotations

import pytest
import torch

from unirl.models import UnifiedModel, load_model_config

# part -> (published size, allowed absolute deviation)
PUBLISHED = {
    "lm_total": (3.75e9, 0.005 * 3.75e9),
    "vision": (0.67e9, 0.005 * 0.67e9),
    "dit": (1.6e9, 0.005 * 1.6e9),
    "vae": (0.3e9, 0.05e9),
}


@pytest.fixture(scope="module")
def meta_model():
    cfg = load_model_config("full")
    with torch.device("meta"):
        model = UnifiedModel.build(cfg, tokenizer=None, load_weights=False)
    return model


def count(params) -> int:
    return sum(p.numel() for p in params)


def test_built_on_meta_without_memory(meta_model):
    assert all(p.is_meta for p in meta_model.parameters())
    assert meta_model.dtype == torch.bfloat16
    # parameters are bf16, rotary frequencies stay float32
    assert meta_model.lm.model.language_model.rotary_emb.inv_freq.dtype == torch.float32


@pytest.mark.parametrize("part", sorted(PUBLISHED))
def test_parameter_counts_match_published_sizes(meta_model, part):
    groups = meta_model.parameter_groups()
    got = {
        "lm_total": count(meta_model.lm.parameters()),
        "vision": count(p for _, p in groups["vision"]),
        "dit": count(meta_model.dit.parameters()),
        "vae": count(meta_model.vae.parameters()),
    }[part]
    size, tol = PUBLISHED[part]
    assert abs(got - size) <= tol, f"{part}: {got:,} vs published {size:,.0f}"


def test_full_architecture_shape(meta_model):
    cfg = meta_model.config
    assert cfg.n_query == 256 and cfg.resolution == 1024
    assert meta_model.t2i_queries.shape == meta_model.i2i_queries.shape == (1, 256, 2048)
    assert meta_model.latent_shape == (32, 32, 32)  # DC-AE f32c32 at 1024 px
    assert len(meta_model.connector.blocks) == 12 and meta_model.connector.proj.out_features == 2304
    assert meta_model.lm.lm_head.weight is meta_model.lm.get_input_embeddings().weight  # tied, as Qwen2.5-VL-3B
    d, h = 2048, int(2.0 * 2048)
    block = (3 * d * d + 3 * d) + (d * d + d) + 2 * (d * h + h) + (h * d + d) + 2 * d + 2 * (d // 16)
    assert count(meta_model.connector.parameters()) == 12 * block + d + (d * 2304 + 2304)
    # the reference path is a copy of the patch embedding (32 -> 2240, patch 1) plus a 2240 x 2240 linear
    assert count(meta_model.ref_patch_embed.parameters()) == count(meta_model.dit.patch_embed.parameters())
    assert count(meta_model.ref_proj.parameters()) == 2240 * 2240 + 2240


def test_missing_local_weights_are_a_clear_error():
    cfg = load_model_config("full")
    cfg.lm.path = "/nonexistent/Qwen2.5-VL-3B-Instruct"
    with pytest.raises(FileNotFoundError, match="lm.path.*Qwen2.5-VL-3B-Instruct"):
        UnifiedModel.build(cfg, tokenizer=None, load_weights=True)
