"""SFT losses of the unified model.

``flow_matching_loss`` - rectified-flow velocity matching, exactly as the paper's code (BLIP3o-based):

* ``sigma = sigmoid(z)``, ``z ~ N(0, 1)`` per sample (logit-normal), **no shift** (the paper's code uses
  ``sigma = u`` directly; the scheduler's shift only shapes the sampling grid, see :mod:`unirl.models.scheduler`);
* ``x_sigma = (1 - sigma) * x0 + sigma * eps``; target ``eps - x0``; plain MSE over all latent elements;
* reference latents (editing) are noised ``0.8 * ref + 0.2 * eps'`` with a fresh ``eps'``;
* condition dropout from one uniform draw ``r`` per sample, as ``mask_drop_joint``: ``r < p_text`` drops the
  text, the next ``p_ref`` drops the reference, the next ``p_both`` drops both. A dropped text is the ZEROED
  connector output (the CFG unconditional branch); a dropped reference is zero reference latents (what "no
  reference" means everywhere, so T2I samples need no special case).

All randomness comes from ``generator`` in a fixed order (r, z, eps, eps'), so a run and its resume draw the same
noise when they seed the generator the same way.

``lm_loss`` - next-token cross-entropy on the response tokens only (``response + <|im_end|>``), after the
chat-templated prompt (and image); prompt, image and pad positions are labelled -100. Token-level mean over the
batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from unirl.models.inputs import IGNORE_INDEX
from unirl.models.outputs import Conditioning
from unirl.models.unified import UnifiedModel


def _randn(shape: Sequence[int], generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    dev = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=dev).to(like.device, like.dtype)


def dropout_masks(
    r: torch.Tensor, drop_text: float, drop_ref: float, drop_both: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep-masks (text, ref), each (B,) float, from uniforms ``r`` (B,) split into the three dropout bands."""
    text_band = r < drop_text
    ref_band = (r >= drop_text) & (r < drop_text + drop_ref)
    both_band = (r >= drop_text + drop_ref) & (r < drop_text + drop_ref + drop_both)
    keep_text = (~(text_band | both_band)).float()
    keep_ref = (~(ref_band | both_band)).float()
    return keep_text, keep_ref


def flow_matching_loss(
    model: UnifiedModel,
    latents: torch.Tensor,
    cond: Conditioning,
    ref_latents: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    drop_text: float = 0.05,
    drop_ref: float = 0.05,
    drop_both: float = 0.05,
) -> torch.Tensor:
    """Velocity-matching MSE for clean ``latents`` (B, C, h, w) under ``cond`` (and optional ``ref_latents``)."""
    B = latents.shape[0]
    if len(cond) != B:
        raise ValueError(f"conditioning has {len(cond)} samples for {B} latents")
    dev = generator.device if generator is not None else latents.device
    r = torch.rand(B, generator=generator, device=dev).to(latents.device)  # (B,)
    sigma = torch.sigmoid(torch.randn(B, generator=generator, device=dev)).to(latents.device)  # (B,)
    eps = _randn(latents.shape, generator, latents)  # (B, C, h, w)
    keep_text, keep_ref = dropout_masks(r, drop_text, drop_ref, drop_both)
    x_sigma = model.scheduler.add_noise(latents, eps, sigma)
    ref = None
    if ref_latents is not None:
        ref = 0.8 * ref_latents + 0.2 * _randn(ref_latents.shape, generator, ref_latents)
        ref = ref * keep_ref.view(-1, 1, 1, 1).to(ref.dtype)
    pred = model.velocity(x_sigma, sigma, cond.keep(keep_text), ref)
    return F.mse_loss(pred.float(), (eps - latents).float())


def lm_loss(
    model: UnifiedModel,
    prompts: Sequence[str],
    responses: Sequence[str],
    images: Sequence[Image.Image | None] | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``responses`` given chat-templated ``prompts`` (+ images); prompt tokens masked."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    inputs = model._require_text()
    batch = model.build_inputs(prompts, images, target_ids=[inputs.response_ids(r) for r in responses])
    logits = model.lm_logits(batch)  # (B, L, V)
    labels = batch.labels[:, 1:]  # (B, L - 1): token t is predicted from position t - 1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
