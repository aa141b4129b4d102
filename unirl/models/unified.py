"""The unified model: a Qwen2.5-VL LM expert joined to a SANA DiT expert by task queries and a connector.

Architecture (UniRL-Zero / BLIP3o-MetaQuery style, as the paper's code):

* **LM expert** - transformers' ``Qwen2_5_VLForConditionalGeneration`` (vision tower included).
* **Queries** - ``t2i_queries`` and ``i2i_queries`` (``[1, n_query, d_lm]``; ``randn * query_init_std``: 1 in the
  full profile as the paper's code, the LM embedding std in the tiny one, whose fresh LM has tiny residuals),
  appended as input embeddings AFTER the chat-templated prompt (left padding keeps them last). The LM's final
  (normed) hidden states at those N positions go to the connector. Gradients flow through a frozen LM into them.
* **Connector** - see :mod:`unirl.models.connector`; its output replaces SANA's text-encoder features
  (``encoder_hidden_states``; the DiT's own caption_projection and caption_norm still apply).
* **DM expert** - diffusers' ``SanaTransformer2DModel``, trained as a velocity predictor (``v = eps - x0``, timestep
  ``1000 * sigma``); latents are DC-AE latents x scaling factor: SANA's f32c32 DC-AE (full) or the f4c8 one the
  ``vae`` stage trains (tiny); a profile without a VAE denoises the RGB image in [-1, 1] (pixel space).
* **Reference path (editing)** - ``ref_patch_embed`` (a copy of the DiT's patch embedding, initialised from it)
  followed by ``ref_proj`` (a zero-initialised Linear); its output is ADDED to the noisy-latent patch embedding.
  Implemented with a forward hook on ``dit.patch_embed`` so the DiT's own forward (and its state-dict keys, hence
  ``from_pretrained`` of SANA weights) stay untouched; the hook adds nothing unless :meth:`velocity` is running.
  As in the paper's code, "no reference" means zero reference latents, so a T2I sample and an edit with its
  reference dropped are the same input; at init ``ref_proj`` is zero and the path is exactly the identity.
* **CFG** - the unconditional branch is the ZEROED connector output; editing uses
  ``v_null + w_ref (v_ref - v_null) + w (v_txt - v_ref)`` with v_ref = (zero text, ref), v_null = (zero, zero).
  Reference latents are noised ``0.8 ref + 0.2 eps`` at sampling as in training (the paper's code does both).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from torch import nn
from transformers import PreTrainedTokenizerBase, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from unirl.models.config import ModelConfig
from unirl.models.connector import Connector
from unirl.models.inputs import InputBuilder, LMBatch
from unirl.models.outputs import Conditioning, TextSamples
from unirl.models.scheduler import FlowMatchEulerScheduler
from unirl.models.tokenizer import SpecialTokens, special_token_ids

TASKS = ("t2i", "i2i")
# Parameter groups each training mode updates (everything else is frozen: requires_grad False).
TRAIN_MODES: dict[str, tuple[str, ...]] = {
    "dm_sft": ("dit", "connector", "t2i_queries", "i2i_queries", "ref"),
    "lm_sft": ("lm", "vision"),
    "t2i": ("dit", "connector", "t2i_queries"),
    "edit": ("dit", "connector", "i2i_queries", "ref"),
    "lm": ("lm", "vision"),
    "joint": ("lm", "vision", "dit", "connector", "t2i_queries", "i2i_queries", "ref"),
    "all": ("lm", "vision", "dit", "connector", "t2i_queries", "i2i_queries", "ref"),
    "none": (),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class UnifiedModel(nn.Module):
    def __init__(self, config: ModelConfig, lm: Qwen2_5_VLForConditionalGeneration, dit: SanaTransformer2DModel,
                 vae: AutoencoderDC | None, tokenizer: PreTrainedTokenizerBase | None) -> None:
        super().__init__()
        self.config = config
        self.lm = lm
        self.dit = dit
        self.vae = vae
        set_dit_self_attention(dit, config.dit_self_attention)
        if vae is not None:
            vae.requires_grad_(False).eval()
        d_lm = lm.config.text_config.hidden_size
        inner = dit.config.num_attention_heads * dit.config.attention_head_dim
        self.connector = Connector(d_lm, dit.config.caption_channels, config.connector.n_layers,
                                   config.connector.n_heads, config.connector.mlp_ratio)
        std = config.query_init_std
        if std is None:  # match the scale of the LM's token embeddings
            std = 0.02 if lm.device.type == "meta" else float(lm.get_input_embeddings().weight.detach().float().std())
        self.t2i_queries = nn.Parameter(torch.randn(1, config.n_query, d_lm) * std)
        self.i2i_queries = nn.Parameter(torch.randn(1, config.n_query, d_lm) * std)
        self.ref_patch_embed = copy.deepcopy(dit.patch_embed)
        self.ref_proj = nn.Linear(inner, inner)
        nn.init.zeros_(self.ref_proj.weight)
        nn.init.zeros_(self.ref_proj.bias)
        self._ref_tokens: torch.Tensor | None = None
        self.dit.patch_embed.register_forward_hook(self._add_reference)
        self.scheduler = FlowMatchEulerScheduler(config.sampling.shift)
        self.tokenizer = tokenizer
        self.special: SpecialTokens | None = None
        self.inputs: InputBuilder | None = None
        if tokenizer is not None:
            self.special = special_token_ids(tokenizer)
            v = lm.config.vision_config
            self.inputs = InputBuilder(tokenizer, self.special, v.patch_size, v.spatial_merge_size,
                                       v.temporal_patch_size, config.vision_min_pixels, config.vision_max_pixels)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, config: ModelConfig, tokenizer: PreTrainedTokenizerBase | None,
              load_weights: bool = True) -> UnifiedModel:
        """Build from a profile: experts from their local ``path`` (if ``load_weights``) or from ``config`` kwargs.

        ``tokenizer=None`` is for architecture-only builds (e.g. on the meta device): token ids stay as in the
        LM config and the text methods are unavailable.
        """
        special = special_token_ids(tokenizer) if tokenizer is not None else None
        dtype = DTYPES[config.dtype]
        if load_weights and config.lm.path:
            lm = Qwen2_5_VLForConditionalGeneration.from_pretrained(_existing(config.lm.path, "lm.path"), dtype=dtype)
            if tokenizer is not None and len(tokenizer) > lm.config.text_config.vocab_size:
                lm.resize_token_embeddings(len(tokenizer))
        else:
            lm = Qwen2_5_VLForConditionalGeneration(lm_config(config.lm.config, special, tokenizer))
        if special is not None and lm.config.image_token_id != special.image_pad:
            raise ValueError(f"LM config image_token_id={lm.config.image_token_id} but the tokenizer's "
                             f"<|image_pad|> is {special.image_pad}: LM and tokenizer do not belong together")
        if load_weights and config.dit.path:
            dit = SanaTransformer2DModel.from_pretrained(_existing(config.dit.path, "dit.path"))
        else:
            dit = SanaTransformer2DModel(**config.dit.config)
        vae = None
        if load_weights and config.vae.path:
            vae = AutoencoderDC.from_pretrained(_existing(config.vae.path, "vae.path"))
        elif config.vae.config:
            vae = AutoencoderDC(**config.vae.config)
        return cast_parameters(cls(config, lm, dit, vae, tokenizer), dtype)

    @classmethod
    def from_pretrained(cls, path: Any, device: torch.device | str | None = None) -> UnifiedModel:
        """Load a directory written by :meth:`save_pretrained` (see :mod:`unirl.models.io`)."""
        from unirl.models.io import load_pretrained

        return load_pretrained(path, device=device)

    def save_pretrained(self, path: Any) -> None:
        """Write config JSON + safetensors + tokenizer to ``path`` atomically (see :mod:`unirl.models.io`)."""
        from unirl.models.io import save_pretrained

        save_pretrained(self, path)

    def train(self, mode: bool = True) -> UnifiedModel:
        """As ``nn.Module.train``, but the frozen VAE always stays in eval mode."""
        super().train(mode)
        if self.vae is not None:
            self.vae.eval()
        return self

    # ------------------------------------------------------------------ parameters
    @property
    def device(self) -> torch.device:
        return self.t2i_queries.device

    @property
    def dtype(self) -> torch.dtype:
        return self.t2i_queries.dtype

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Named parameters by component: lm, vision, connector, t2i_queries, i2i_queries, dit, ref, vae."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            k: [] for k in ("lm", "vision", "connector", "t2i_queries", "i2i_queries", "dit", "ref", "vae")}
        for name, p in self.named_parameters():
            if name.startswith("lm.model.visual."):
                groups["vision"].append((name, p))
            elif name.startswith("lm."):
                groups["lm"].append((name, p))
            elif name.startswith(("ref_patch_embed.", "ref_proj.")):
                groups["ref"].append((name, p))
            else:
                groups[name.split(".")[0]].append((name, p))
        return groups

    def trainable_parameters(self, mode: str) -> list[nn.Parameter]:
        """The parameters ``mode`` updates (see ``TRAIN_MODES``)."""
        if mode not in TRAIN_MODES:
            raise ValueError(f"unknown training mode {mode!r}; known: {sorted(TRAIN_MODES)}")
        groups = self.parameter_groups()
        return [p for g in TRAIN_MODES[mode] for _, p in groups[g]]

    def set_trainable(self, mode: str) -> list[nn.Parameter]:
        """Set ``requires_grad`` True exactly on ``mode``'s parameters and False elsewhere; return them."""
        params = self.trainable_parameters(mode)
        keep = {id(p) for p in params}
        for p in self.parameters():
            p.requires_grad_(id(p) in keep)
        return params

    # ------------------------------------------------------------------ LM side
    def _require_text(self) -> InputBuilder:
        if self.inputs is None:
            raise RuntimeError("this UnifiedModel was built without a tokenizer; text methods need one")
        return self.inputs

    def position_ids(self, batch: LMBatch) -> torch.Tensor:
        """Qwen2.5-VL 3D rotary positions (3, B, L), computed explicitly (no cached rope deltas)."""
        pos, _ = self.lm.model.get_rope_index(
            batch.input_ids, mm_token_type_ids=batch.mm_token_type_ids, image_grid_thw=batch.image_grid_thw,
            attention_mask=batch.attention_mask)
        return pos

    def input_embeds(self, batch: LMBatch) -> torch.Tensor:
        """Token embeddings with the vision tower's features scattered into the image-pad positions (B, L, D)."""
        embeds = self.lm.get_input_embeddings()(batch.input_ids)  # (B, L, D)
        if batch.pixel_values is not None:
            feats = self.lm.model.get_image_features(batch.pixel_values, batch.image_grid_thw).pooler_output
            feats = torch.cat(list(feats), 0).to(embeds.dtype)  # (n_image_tokens, D)
            mask = (batch.input_ids == self.special.image_pad).unsqueeze(-1)  # (B, L, 1)
            if int(mask.sum()) != feats.shape[0]:
                raise ValueError(f"{int(mask.sum())} image-pad tokens but {feats.shape[0]} vision features")
            embeds = embeds.masked_scatter(mask, feats)
        return embeds

    def lm_hidden(self, batch: LMBatch, embeds: torch.Tensor, **kwargs: Any) -> Any:
        """Run the LM decoder on ``embeds`` with explicit positions; returns the transformers output."""
        return self.lm.model.language_model(inputs_embeds=embeds, attention_mask=batch.attention_mask,
                                            position_ids=self.position_ids(batch), **kwargs)

    def lm_logits(self, batch: LMBatch) -> torch.Tensor:
        """Teacher-forced next-token logits (B, L, V)."""
        out = self.lm_hidden(batch.to(self.device), self.input_embeds(batch.to(self.device)), use_cache=False)
        return self.lm.lm_head(out.last_hidden_state)

    def completion_logprobs(self, prompts: Sequence[str], completion_ids: Sequence[Sequence[int]],
                            images: Sequence[Image.Image | None] | None = None,
                            temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs of given completions (teacher forcing, same layout as sampling).

        Returns ``(logp, mask)``, both (B, T) with T the longest completion; row i holds its ``len_i`` tokens
        left-aligned, ``mask`` 1 on them. Logits are divided by ``temperature`` first (sampling temperature).
        """
        batch = self.build_inputs(prompts, images, suffix_ids=completion_ids)
        logits = self.lm_logits(batch).float() / max(temperature, 1e-6)  # (B, L, V)
        B, L = batch.input_ids.shape
        lens = torch.tensor([len(c) for c in completion_ids], device=logits.device)  # (B,)
        T = max(int(lens.max()), 1) if B else 1
        j = torch.arange(T, device=logits.device)
        mask = (j[None] < lens[:, None]).long()  # (B, T)
        src = ((L - lens - 1)[:, None] + j[None]).clamp(0, L - 1)  # (B, T) position that predicts token j
        tokens = batch.input_ids.gather(1, (src + 1).clamp(max=L - 1))  # (B, T)
        logp = logits.log_softmax(-1)[torch.arange(B, device=logits.device)[:, None], src, tokens]  # (B, T)
        return logp * mask, mask

    def build_inputs(self, prompts: Sequence[str], images: Sequence[Image.Image | None] | None = None,
                     **kwargs: Any) -> LMBatch:
        return self._require_text().build(prompts, images, **kwargs).to(self.device, self.dtype)

    def encode(self, prompts: Sequence[str], images: Sequence[Image.Image | None] | None = None, task: str = "t2i",
               prefix_ids: Sequence[Sequence[int]] | None = None) -> Conditioning:
        """Prompt (+ image through the vision tower) + the task's queries -> DiT conditioning (B, N, d_caption)."""
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
        inputs = self._require_text()
        N = self.config.n_query
        batch = self.build_inputs(prompts, images, suffix_ids=prefix_ids, n_query=N,
                                  query_id=inputs.special.query(task))
        embeds = self.input_embeds(batch)  # (B, L, D)
        queries = (self.t2i_queries if task == "t2i" else self.i2i_queries).to(embeds.dtype)
        embeds = torch.cat([embeds[:, :-N], queries.expand(embeds.shape[0], -1, -1)], 1)  # (B, L, D)
        hidden = self.lm_hidden(batch, embeds, use_cache=False).last_hidden_state[:, -N:]  # (B, N, D)
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)  # (B, N)
        return Conditioning(self.connector(hidden), mask)

    @torch.no_grad()
    def sample_text(self, prompts: Sequence[str], images: Sequence[Image.Image | None] | None = None,
                    max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                    seed: int | None = None, generator: torch.Generator | None = None,
                    group_size: int = 1) -> TextSamples:
        """Autoregressive sampling with a KV cache (greedy at temperature 0), stopping each sample at EOS.

        ``group_size`` G > 1: consecutive runs of G samples share their prompt (and image object), which is then
        prefilled once per group (GRPO rollouts); the samples are the same as with G = 1 up to float error.
        """
        from unirl.models.sampling import sample_text

        return sample_text(self, prompts, images, max_new_tokens, temperature, top_k, _generator(seed, generator),
                           group_size)

    def generate_text(self, prompts: Sequence[str], images: Sequence[Image.Image | None] | None = None,
                      max_new_tokens: int = 64, temperature: float = 1.0, top_k: int | None = None,
                      seed: int | None = None, generator: torch.Generator | None = None) -> list[str]:
        """Sampled (or greedy, temperature 0) completions as text, EOS removed; see :meth:`sample_text`."""
        return self.sample_text(prompts, images, max_new_tokens, temperature, top_k, seed, generator).texts

    # ------------------------------------------------------------------ DM side
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of the DiT's input at the profile resolution."""
        f = 1 if self.vae is None else 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)
        r = self.config.resolution // f
        return (self.dit.config.in_channels, r, r)

    def _add_reference(self, module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        return output if self._ref_tokens is None else output + self._ref_tokens

    def velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                 ref_latents: torch.Tensor | None = None) -> torch.Tensor:
        """DiT velocity ``v(x_sigma) ~ eps - x0`` (B, C, H, W); ``ref_latents`` None means zero reference."""
        dtype = self.dit.dtype
        x = latents.to(dtype)
        with self.reference(torch.zeros_like(x) if ref_latents is None else ref_latents):
            return self.dit(hidden_states=x, encoder_hidden_states=cond.hidden.to(dtype),
                            timestep=self.scheduler.timestep(sigma.to(dtype).expand(x.shape[0])),
                            encoder_attention_mask=cond.mask, return_dict=False)[0]

    @contextlib.contextmanager
    def reference(self, ref_latents: torch.Tensor) -> Iterator[None]:
        """Add the reference tokens of ``ref_latents`` (B or 1, C, H, W) to the patch embedding of every DiT call
        inside the block. T2I passes zeros: after SFT their tokens are a learned constant, part of the T2I model."""
        self._ref_tokens = self.ref_proj(self.ref_patch_embed(ref_latents.to(self.dit.dtype)))  # (B, L, inner)
        try:
            yield
        finally:
            self._ref_tokens = None

    def text_guidance_weight(self, sigma: torch.Tensor, cfg_scale: float, edit: bool = False) -> torch.Tensor:
        """Text CFG weight per sample (shape of ``sigma``) for the configured ``cfg_schedule``.

        constant: ``cfg_scale``; linear: ``1 + (cfg_scale - 1)(1 - sigma)``. Text-to-image only (``edit`` False):
        1 above the guidance interval ``cfg_max_sigma``.
        """
        s = self.config.sampling
        sig = sigma.to(torch.float32)
        w = 1.0 + (cfg_scale - 1.0) * (1.0 - sig) if s.cfg_schedule == "linear" else torch.full_like(sig, cfg_scale)
        return w if edit else torch.where(sig <= s.cfg_max_sigma, w, torch.ones_like(w))

    def guided_velocity(self, latents: torch.Tensor, sigma: torch.Tensor, cond: Conditioning,
                        ref_latents: torch.Tensor | None = None, cfg_scale: float = 1.0,
                        ref_cfg_scale: float = 1.0) -> torch.Tensor:
        """CFG-combined velocity in one batched DiT pass (rollout and RL loss must both use this).

        T2I: ``v_u + w (v_c - v_u)``; editing (``ref_latents`` given): the triple form with ``w_ref``.
        The text weight ``w`` is per sample, from its ``sigma`` (scalar or (B,)): :meth:`text_guidance_weight`
        (the schedule ``config.sampling.cfg_schedule``, both forms; for T2I also the guidance interval
        ``cfg_max_sigma``), so a batched replay of transitions from different steps computes what the rollout did.
        T2I samples whose weight is 1 get the conditional velocity alone, and the unconditional pass runs only on
        the others (none: skipped). ``w_ref`` is constant.
        """
        B = latents.shape[0]
        sigma = sigma.expand(B)
        if ref_latents is None:
            w = self.text_guidance_weight(sigma, cfg_scale)  # (B,)
            guided = w != 1.0  # (B,) bool
            if not bool(guided.any()):
                return self.velocity(latents, sigma, cond)
            if bool(guided.all()):
                both = Conditioning.cat([cond.zeroed(), cond])
                v_u, v_c = self.velocity(latents.repeat(2, 1, 1, 1), sigma.repeat(2), both).chunk(2)
                return v_u + w.to(v_c.dtype).view(B, 1, 1, 1) * (v_c - v_u)
            g = guided.nonzero().squeeze(1)  # (Bg,) the guided samples
            v_c = self.velocity(latents, sigma, cond)  # (B, C, H, W)
            v_u = self.velocity(latents[g], sigma[g], cond.index(g).zeroed())  # (Bg, C, H, W)
            return v_c.index_copy(0, g, v_u + w[g].to(v_c.dtype).view(-1, 1, 1, 1) * (v_c[g] - v_u))
        if cfg_scale == 1.0 and ref_cfg_scale == 1.0:
            return self.velocity(latents, sigma, cond, ref_latents)
        three = Conditioning.cat([cond.zeroed(), cond.zeroed(), cond])
        refs = torch.cat([torch.zeros_like(ref_latents), ref_latents, ref_latents])
        v_null, v_ref, v_txt = self.velocity(latents.repeat(3, 1, 1, 1), sigma.repeat(3), three, refs).chunk(3)
        w = self.text_guidance_weight(sigma, cfg_scale, edit=True).to(v_txt.dtype).view(B, 1, 1, 1)
        return v_null + ref_cfg_scale * (v_ref - v_null) + w * (v_txt - v_ref)

    @staticmethod
    def noise_reference(ref_latents: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``0.8 * ref + 0.2 * eps`` (the reference noising of training and sampling)."""
        eps = torch.randn(ref_latents.shape, generator=generator, device=_gen_device(generator, ref_latents))
        return 0.8 * ref_latents + 0.2 * eps.to(ref_latents.device, ref_latents.dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """Images -> DiT latents (B, C, h, w): pixels in [-1, 1], through DC-AE (x scaling factor) if present."""
        r = self.config.resolution
        arrs = []
        for im in images:
            im = im.convert("RGB")
            if im.size != (r, r):
                im = im.resize((r, r), Image.Resampling.BICUBIC)
            arrs.append(np.asarray(im, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 127.5 - 1.0  # (B, 3, r, r)
        x = x.to(self.device, self.dtype)
        if self.vae is None:
            return x
        return self.vae.encode(x).latent * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> list[Image.Image]:
        """DiT latents -> PIL images."""
        x = latents
        if self.vae is not None:
            x = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
        x = ((x.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)  # (B, 3, H, W)
        return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]

    @torch.no_grad()
    def sample_latents(self, prompts: Sequence[str], images: Sequence[Image.Image] | None = None,
                       task: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                       ref_cfg_scale: float | None = None, seed: int | None = None,
                       generator: torch.Generator | None = None, prefix_ids: Sequence[Sequence[int]] | None = None,
                       cond: Conditioning | None = None) -> torch.Tensor:
        """Euler ODE sampling with CFG from pure noise; returns the final latents (B, C, h, w)."""
        from unirl.models.sampling import sample_latents

        s = self.config.sampling
        task = task or ("i2i" if images is not None else "t2i")
        return sample_latents(self, prompts, images, task, steps or s.steps,
                              s.cfg_scale if cfg_scale is None else cfg_scale,
                              s.ref_cfg_scale if ref_cfg_scale is None else ref_cfg_scale,
                              _generator(seed, generator), prefix_ids, cond)

    @torch.no_grad()
    def generate_images(self, prompts: Sequence[str], images: Sequence[Image.Image] | None = None,
                        task: str | None = None, steps: int | None = None, cfg_scale: float | None = None,
                        ref_cfg_scale: float | None = None, seed: int | None = None,
                        generator: torch.Generator | None = None,
                        prefix_ids: Sequence[Sequence[int]] | None = None) -> list[Image.Image]:
        """T2I (``images`` None) or editing (``task='i2i'``, the source images) -> PIL images at the resolution."""
        latents = self.sample_latents(prompts, images, task, steps, cfg_scale, ref_cfg_scale, seed, generator,
                                      prefix_ids)
        return self.decode_latents(latents)


def set_dit_self_attention(dit: SanaTransformer2DModel, mode: str) -> None:
    """``"linear"``: SANA's own linear attention; ``"softmax"``: diffusers' SDPA processor on the same weights."""
    if mode == "softmax":
        for block in dit.transformer_blocks:
            block.attn1.set_processor(AttnProcessor2_0())
    elif mode != "linear":
        raise ValueError(f"dit_self_attention must be 'linear' or 'softmax', got {mode!r}")


def lm_config(kwargs: dict, special: SpecialTokens | None,
              tokenizer: PreTrainedTokenizerBase | None) -> Qwen2_5_VLConfig:
    """``Qwen2_5_VLConfig`` from profile kwargs, with token ids and vocabulary size taken from the tokenizer."""
    kw = copy.deepcopy(kwargs)
    text = dict(kw.pop("text_config", {}))
    vision = dict(kw.pop("vision_config", {}))
    if special is not None:
        text.update(vocab_size=max(len(tokenizer), text.get("vocab_size", 0)), eos_token_id=special.eos,
                    pad_token_id=special.pad, bos_token_id=None)
        kw.update(image_token_id=special.image_pad, video_token_id=special.video_pad,
                  vision_start_token_id=special.vision_start, vision_end_token_id=special.vision_end)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **kw)


def cast_parameters(model: UnifiedModel, dtype: torch.dtype) -> UnifiedModel:
    """Cast parameters (not buffers: rotary frequencies and position tables stay float32) to ``dtype``."""
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)
    return model


def _existing(path: str, key: str) -> str:
    from pathlib import Path

    if not Path(path).exists():
        raise FileNotFoundError(f"model profile key {key} points to {path}, which does not exist; "
                                "download the weights there (nothing is fetched at run time) or set it to null")
    return path


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None:
        return generator
    return None if seed is None else torch.Generator().manual_seed(seed)


def _gen_device(generator: torch.Generator | None, like: torch.Tensor) -> torch.device:
    return generator.device if generator is not None else like.device
