"""Sampling loops of the unified model: text (KV-cached autoregressive) and images (Euler ODE with CFG).

Text: prefill the chat-templated prompt once (once per group when G samples share a prompt: the KV cache is
repeated G times, :func:`prefill`), then one token per step with a ``DynamicCache``; the next token's
rotary position is the prompt's last position + 1 (the same rule as Qwen2.5-VL's rope deltas, computed here
explicitly so no state is cached on the LM). Temperature 0 is greedy; ``top_k`` keeps the k largest logits.
Samples stop at the first EOS (``<|im_end|>``) and then emit pads, which are not returned.

Images: ``x_T ~ N(0, I)``, then ``x <- x + (sigma_{k+1} - sigma_k) * v_hat(x, sigma_k)`` over the scheduler's
shifted sigmas, with ``v_hat`` the CFG-combined velocity of :meth:`UnifiedModel.guided_velocity`. For editing the
source images give both the vision-tower tokens (in ``encode``) and the reference latents, noised once per call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import DynamicCache

if TYPE_CHECKING:
    from unirl.models.outputs import Conditioning, TextSamples
    from unirl.models.unified import UnifiedModel


def next_token(logits: torch.Tensor, temperature: float, top_k: int | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # inverse-CDF draw: token j with cdf_{j-1} < u <= cdf_j, u ~ U[0, total mass); an exact categorical sample from
    # one uniform per row (on CPU ~8x faster than torch.multinomial at this vocabulary); masked tokens have p = 0
    # and so are never drawn
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    if not bool(torch.isfinite(cdf[:, -1]).all()):  # (torch.multinomial raised here; keep a NaN policy loud)
        raise ValueError("next_token: the logits contain NaN or Inf (a diverged model or corrupt weights); "
                         "check the checkpoint and the last training steps' losses")
    dev = generator.device if generator is not None else cdf.device
    u = torch.rand((cdf.shape[0], 1), generator=generator, device=dev).to(cdf.device) * cdf[:, -1:]  # (B, 1)
    return (cdf < u).sum(-1)


@dataclass
class Prefill:
    """The LM state after the prompts: what sampling and teacher forcing continue from (B samples)."""

    last_hidden: torch.Tensor  # (B, D) final hidden state at each prompt's last position (predicts token 0)
    cache: DynamicCache  # keys/values of the prompts, B rows
    attention_mask: torch.Tensor  # (B, Lp) the prompts' padding mask
    next_pos: torch.Tensor  # (B,) rotary position of the first completion token


def prefill(model: UnifiedModel, prompts: Sequence[str], images: Sequence[Image.Image | None] | None,
            group_size: int = 1) -> Prefill:
    """Run the prompts through the LM, ONCE per group: samples ``g*G .. g*G+G-1`` must share their prompt and image
    (the same object), and the group's cache, hidden state, mask and position are repeated G times.

    Differentiable when grad is enabled (gradients of all G samples flow into the shared prompt states).
    """
    B, G = len(prompts), group_size
    if G < 1 or B % G or (images is not None and len(images) != B):
        raise ValueError(f"prefill: {B} prompts, {None if images is None else len(images)} images, group size {G}")
    firsts = list(range(0, B, G))
    for i in range(B) if G > 1 else ():  # G = 1: every sample is its own group
        j = i - i % G
        if prompts[i] != prompts[j] or (images is not None and images[i] is not images[j]):
            raise ValueError(f"prefill: sample {i} does not share the prompt/image of its group's first sample")
    batch = model.build_inputs([prompts[j] for j in firsts], [images[j] for j in firsts] if images else None)
    pos = model.position_ids(batch)  # (3, P, Lp)
    cache = DynamicCache(config=model.lm.config.text_config)
    out = model.lm.model.language_model(inputs_embeds=model.input_embeds(batch), attention_mask=batch.attention_mask,
                                        position_ids=pos, cache=cache, use_cache=True)
    if G > 1:
        cache.batch_repeat_interleave(G)
    return Prefill(last_hidden=out.last_hidden_state[:, -1].repeat_interleave(G, 0),  # (B, D)
                   cache=cache, attention_mask=batch.attention_mask.repeat_interleave(G, 0),  # (B, Lp)
                   next_pos=(pos.amax(dim=(0, 2)) + 1).repeat_interleave(G))  # (B,)


def sample_text(model: UnifiedModel, prompts: Sequence[str], images: Sequence[Image.Image | None] | None,
                max_new_tokens: int, temperature: float, top_k: int | None,
                generator: torch.Generator | None, group_size: int = 1) -> TextSamples:
    from unirl.models.outputs import TextSamples

    special = model._require_text().special
    start = prefill(model, prompts, images, group_size)
    B = len(prompts)
    cache, mask, next_pos = start.cache, start.attention_mask, start.next_pos
    logits = model.lm.lm_head(start.last_hidden)  # (B, V)
    finished = torch.zeros(B, dtype=torch.bool, device=mask.device)
    steps: list[torch.Tensor] = []
    embed = model.lm.get_input_embeddings()
    for _ in range(max_new_tokens):
        tok = next_token(logits, temperature, top_k, generator)
        tok = torch.where(finished, torch.full_like(tok, special.pad), tok)  # (B,)
        steps.append(tok)
        finished = finished | (tok == special.eos)
        if bool(finished.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (B, L + t)
        p = next_pos.view(1, B, 1).expand(3, B, 1)  # (3, B, 1)
        out = model.lm.model.language_model(inputs_embeds=embed(tok[:, None]), attention_mask=mask, position_ids=p,
                                            cache=cache, use_cache=True)
        logits = model.lm.lm_head(out.last_hidden_state[:, -1])
        next_pos = next_pos + 1
    ids = torch.stack(steps, 1).tolist() if steps else [[] for _ in range(B)]  # (B, T)
    completions, texts, done = [], [], []
    for row in ids:
        cut = row.index(special.eos) + 1 if special.eos in row else len(row)
        completions.append(row[:cut])
        done.append(special.eos in row)
        texts.append(model.tokenizer.decode([t for t in row[:cut] if t != special.eos], skip_special_tokens=True))
    return TextSamples(texts=texts, completion_ids=completions, finished=done)


def sample_latents(model: UnifiedModel, prompts: Sequence[str], images: Sequence[Image.Image] | None, task: str,
                   steps: int, cfg_scale: float, ref_cfg_scale: float, generator: torch.Generator | None,
                   prefix_ids: Sequence[Sequence[int]] | None, cond: Conditioning | None) -> torch.Tensor:
    if task == "i2i" and images is None:
        raise ValueError("editing (task='i2i') needs the source images")
    if cond is None:
        cond = model.encode(prompts, images, task, prefix_ids)
    B = len(cond)
    ref = None
    if task == "i2i":
        ref = model.noise_reference(model.encode_images(images), generator)  # (B, C, h, w)
    dev = generator.device if generator is not None else model.device
    x = torch.randn((B, *model.latent_shape), generator=generator, device=dev).to(model.device, model.dtype)
    sigmas = model.scheduler.sigmas(steps, device=model.device)  # (T + 1,)
    for k in range(steps):
        v = model.guided_velocity(x, sigmas[k], cond, ref, cfg_scale, ref_cfg_scale)
        x = model.scheduler.step(x, v, sigmas[k], sigmas[k + 1])
    return x
