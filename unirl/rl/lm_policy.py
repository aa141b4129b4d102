"""LM side of GRPO: group rollout of text completions, grouped teacher forcing, and the token-level loss.

Variant implemented (read this before the code):

- **Rollout** (``lm_rollout``): each of the P prompts is repeated G times consecutively (sample ``i`` belongs to
  prompt ``i // G``, the order ``group_advantages`` expects); the policy samples with a KV cache at the sampling
  ``temperature`` (no top-k/top-p, so the sampling distribution is exactly ``softmax(logits / T)``), and every
  completion is cut after its first EOS (``<|im_end|>``) (or before an image/vision control token, which cannot be
  teacher-forced: :func:`cut_control_tokens`). Under ``no_grad`` the rollout records the frozen reference's
  log-probs (``ref_logp``; skipped when ``β_lm = 0``).
- **Old log-probs**: the policy at the first update of a rollout batch IS the sampling policy, so the first
  :func:`lm_loss` call stores its own log-probs, detached, as ``old_logp`` (ratio exactly 1, as in the paper's
  on-policy update) and later inner updates reuse them for the PPO ratio. This is what TRL does with one update per
  batch and saves a no-grad forward per step; ``lm_rollout(record_old=True)`` records them at rollout time instead.
- **Grouped teacher forcing** (:func:`group_logprobs`, rollout and loss alike): the G completions of a prompt share
  it, so the LM runs the prompt (and its image through the vision tower) ONCE per group, the KV cache is repeated
  G times, and the completions are scored on top of it (gradients flow through the shared prompt states). Positions
  follow the sampler's layout (the prompt's own rotary positions, then ``max + 1, max + 2, ...``); the log-probs
  equal :meth:`UnifiedModel.completion_logprobs` up to float error (tested within 1e-5).
- **Loss** (``lm_loss``): DESIGN.md section 1 via :func:`unirl.rl.grpo.lm_grpo_loss`:
  ``-(1/G) Σ_i (1/|y_i|) Σ_l [min(ρ_il A_i, clip(ρ_il, 1±ε) A_i) − β_lm KL_il]`` over completion tokens up to and
  including the first EOS (``completion_mask``), k3 KL to the reference, β_lm and ε passed in from ``params.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from unirl.models.outputs import TextSamples
from unirl.models.sampling import prefill
from unirl.models.unified import UnifiedModel
from unirl.rewards.registry import combine
from unirl.rl.grpo import completion_mask, lm_grpo_loss

__all__ = [
    "TEXT_REWARDS",
    "LMRollout",
    "cut_control_tokens",
    "group_logprobs",
    "lm_loss",
    "lm_rollout",
    "lm_rollout_from_samples",
    "pad_completions",
    "repeat_group",
    "rollout_logprobs",
    "score_rewards",
]

# Rewards scored on the LM's completions; every other configured reward scores the scenario's images.
TEXT_REWARDS = frozenset({"format", "format_answer_only", "answer_accuracy", "judgement"})


@dataclass
class LMRollout:
    """A group rollout of the LM: B = P * G completions, grouped consecutively by prompt."""

    prompts: list[str]  # (B,) the prompt of each sample (each prompt repeated G times)
    images: list[Image.Image | None] | None  # (B,) image shown to the LM with the prompt, or None
    completion_ids: Tensor  # (B, L) long: sampled tokens, right-padded with the pad id after the first EOS
    mask: Tensor  # (B, L) float: 1 on completion tokens up to and including the first EOS
    old_logp: Tensor | None  # (B, L) sampling-policy log-probs (temperature applied, 0 off mask); set by update 0
    ref_logp: Tensor | None  # (B, L) log-probs of the frozen reference, None when β_lm = 0
    texts: list[str]  # (B,) decoded completions, EOS and special tokens removed, tags kept
    finished: list[bool]  # (B,) whether the completion ended with EOS (False: hit max_new_tokens)
    temperature: float  # sampling temperature; the loss must use the same one
    group_size: int = 1  # G: consecutive samples sharing a prompt (and image)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def lengths(self) -> list[int]:
        """|y_i|: completion tokens that carry loss (up to and including the first EOS)."""
        return [int(n) for n in self.mask.sum(dim=1).tolist()]

    def completion_lists(self) -> list[list[int]]:
        """Per sample, the completion ids up to and including the first EOS (what is teacher-forced)."""
        return [row[:n] for row, n in zip(self.completion_ids.tolist(), self.lengths)]


def repeat_group(items: Sequence, group_size: int) -> list:
    """``[a, b] -> [a, a, b, b]`` for ``group_size=2``: each item repeated ``group_size`` times consecutively."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return [x for x in items for _ in range(group_size)]


def pad_completions(completions: Sequence[Sequence[int]], eos_id: int, pad_id: int,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Right-pad completions to (B, L) and mask them up to and including the first EOS; returns ``(ids, mask)``.

    ``L`` is the longest masked completion, so no column is all padding. Tokens after a row's first EOS are dropped.
    """
    B = len(completions)
    lists = [list(c) for c in completions]
    L = max([len(c) for c in lists] + [1])
    ids = torch.full((B, L), pad_id, dtype=torch.long, device=device)  # (B, L)
    length_mask = torch.zeros(B, L, dtype=torch.bool, device=device)  # (B, L)
    for i, c in enumerate(lists):
        if c:
            ids[i, : len(c)] = torch.tensor(c, dtype=torch.long, device=device)
            length_mask[i, : len(c)] = True
    mask = completion_mask(ids, eos_id) * length_mask  # (B, L): up to the first EOS, never into the padding
    keep = max(int(mask.sum(dim=1).max().item()) if B else 1, 1)
    ids = ids[:, :keep].masked_fill(mask[:, :keep] == 0, pad_id)  # (B, L') nothing after the first EOS survives
    return ids, mask[:, :keep]


def group_logprobs(model: UnifiedModel, prompts: Sequence[str], images: Sequence[Image.Image | None] | None,
                   completion_ids: Tensor, group_size: int, temperature: float) -> Tensor:
    """Teacher-forced log-probs (B, L) of ``completion_ids`` (B, L) at ``temperature``, the prompt run once per group.

    ``prompts`` / ``images`` hold one entry per sample (B); samples ``g*G .. g*G+G-1`` must share theirs. Positions
    past a completion's end are scored too (callers mask them). Differentiable when grad is enabled.
    """
    B, L = completion_ids.shape
    G = group_size
    if B % G or len(prompts) != B:
        raise ValueError(f"group_logprobs: {len(prompts)} prompts and {B} completions for group size {G}")
    start = prefill(model, prompts, images, G)  # the prompt once per group, its cache repeated G times
    hidden = [start.last_hidden[:, None]]  # (B, 1, D): predicts completion token 0
    if L > 1:
        pos0 = start.next_pos  # (B,) the sampler's next position
        cpos = (pos0[:, None] + torch.arange(L - 1, device=pos0.device)).unsqueeze(0).expand(3, B, L - 1)
        mask = torch.cat([start.attention_mask, start.attention_mask.new_ones(B, L - 1)], 1)  # (B, Lp + L - 1)
        tokens = model.lm.get_input_embeddings()(completion_ids[:, :-1].to(model.device))  # (B, L - 1, D)
        rest = model.lm.model.language_model(inputs_embeds=tokens, attention_mask=mask, position_ids=cpos,
                                             cache=start.cache, use_cache=True)
        hidden.append(rest.last_hidden_state)  # (B, L - 1, D)
    logits = model.lm.lm_head(torch.cat(hidden, 1)).float() / max(temperature, 1e-6)  # (B, L, V)
    return logits.log_softmax(-1).gather(-1, completion_ids.to(logits.device).unsqueeze(-1)).squeeze(-1)  # (B, L)


def cut_control_tokens(completions: Sequence[Sequence[int]], finished: Sequence[bool],
                       control_ids: set[int]) -> tuple[list[list[int]], list[bool]]:
    """Cut each completion before its first control token (``control_ids``); a cut completion is unfinished.

    Image/video/vision tokens cannot be teacher-forced (the input builder treats ``<|image_pad|>`` as an image
    slot), so such a completion is kept up to that token, as if it had hit the length limit. A trained model
    practically never samples them; a random one does.

    >>> cut_control_tokens([[7, 5, 9, 2], [7, 2]], [True, True], {5})
    ([[7], [7, 2]], [False, True])
    """
    ids, done = [], []
    for row, fin in zip(completions, finished):
        cut = next((k for k, t in enumerate(row) if t in control_ids), None)
        ids.append(list(row) if cut is None else list(row[:cut]))
        done.append(bool(fin) and cut is None)
    return ids, done


@torch.no_grad()
def lm_rollout(model: UnifiedModel, ref_model: UnifiedModel | None, prompts: Sequence[str],
               images: Sequence[Image.Image | None] | None, group_size: int, temperature: float,
               max_new_tokens: int, generator: torch.Generator | None = None, beta: float = 1.0,
               record_old: bool = False) -> LMRollout:
    """Sample ``group_size`` completions per prompt and record reference (and, if asked, old) log-probs.

    ``images`` (one per prompt, or None) are repeated like the prompts. ``beta == 0`` or ``ref_model is None``
    skips the reference forward (``ref_logp`` None).
    """
    if temperature <= 0:
        raise ValueError(f"GRPO needs stochastic sampling: temperature must be > 0, got {temperature}")
    if images is not None and len(images) != len(prompts):
        raise ValueError(f"lm_rollout: {len(images)} images for {len(prompts)} prompts")
    rep_prompts = repeat_group(list(prompts), group_size)
    rep_images = repeat_group(list(images), group_size) if images is not None else None
    samples = model.sample_text(rep_prompts, rep_images, max_new_tokens=max_new_tokens, temperature=temperature,
                                generator=generator, group_size=group_size)  # the prompt prefilled once per group
    return lm_rollout_from_samples(model, ref_model, rep_prompts, rep_images, samples, temperature, beta,
                                   group_size, record_old)


@torch.no_grad()
def lm_rollout_from_samples(model: UnifiedModel, ref_model: UnifiedModel | None, prompts: Sequence[str],
                            images: Sequence[Image.Image | None] | None, samples: TextSamples, temperature: float,
                            beta: float = 1.0, group_size: int = 1, record_old: bool = False) -> LMRollout:
    """The rollout record of given completions (one per prompt, in group order): cut, pad, mask, decode, and the
    reference (and with ``record_old`` the policy's) log-probs teacher-forced at ``temperature`` (what
    :func:`lm_rollout` does after sampling; ``samples.texts`` is not used, the texts are decoded from the kept
    tokens, so reward and loss see the same completion)."""
    if len(samples.completion_ids) != len(prompts):
        raise ValueError(f"{len(samples.completion_ids)} completions for {len(prompts)} prompts")
    sp = model._require_text().special
    control = {sp.image_pad, sp.video_pad, sp.vision_start, sp.vision_end}
    cut, finished = cut_control_tokens(samples.completion_ids, samples.finished, control)
    ids, mask = pad_completions(cut, sp.eos, sp.pad, model.device)  # (B, L) each
    texts = [model.tokenizer.decode([t for t, m in zip(row, keep) if m and t != sp.eos], skip_special_tokens=True)
             for row, keep in zip(ids.tolist(), mask.tolist())]
    rollout = LMRollout(prompts=list(prompts), images=list(images) if images is not None else None,
                        completion_ids=ids, mask=mask, old_logp=None, ref_logp=None, texts=texts, finished=finished,
                        temperature=temperature, group_size=group_size)
    if record_old:
        rollout.old_logp = rollout_logprobs(model, rollout)
    if ref_model is not None and beta != 0:
        rollout.ref_logp = rollout_logprobs(ref_model, rollout)
    return rollout


def rollout_logprobs(model: UnifiedModel, rollout: LMRollout) -> Tensor:
    """``model``'s masked log-probs (B, L) of the rollout's completions (grouped teacher forcing)."""
    logp = group_logprobs(model, rollout.prompts, rollout.images, rollout.completion_ids, rollout.group_size,
                          rollout.temperature)  # (B, L)
    return logp * rollout.mask


def lm_loss(model: UnifiedModel, rollout: LMRollout, advantages: Tensor, clip_eps: float, beta: float,
            update_index: int = 0) -> tuple[Tensor, dict[str, float]]:
    """GRPO loss of the LM on a rollout: recompute log-probs (with grad) at the rollout's temperature and layout,
    then :func:`unirl.rl.grpo.lm_grpo_loss`. On update 0 without recorded old log-probs, this update's own
    log-probs (detached) become ``rollout.old_logp`` for the later inner updates (see the module docstring).

    Returns ``(loss, stats)``; stats (floats): ``policy_loss``, ``kl``, ``clip_fraction``, ``ratio_mean``,
    ``ratio_max_dev``, ``approx_kl_old``, ``completion_len``, ``eos_fraction`` and, on update 0 with old log-probs
    recorded at rollout time, ``logprob_gap`` (mean |rollout - recomputed log-prob|; 0 up to float error).
    """
    if beta != 0 and rollout.ref_logp is None:
        raise ValueError(f"lm_loss: beta_lm={beta} but the rollout has no reference log-probs; "
                         "pass the reference model and the same beta to lm_rollout")
    logp = rollout_logprobs(model, rollout)  # (B, L), with grad
    out: dict[str, float] = {}
    if rollout.old_logp is None:
        if update_index != 0:
            raise ValueError(f"lm_loss: no old log-probs for inner update {update_index}; update 0 must run first")
        rollout.old_logp = logp.detach()
    elif update_index == 0:
        n = rollout.mask.sum().clamp(min=1)
        out["logprob_gap"] = float(((logp.detach() - rollout.old_logp).abs() * rollout.mask).sum() / n)
    adv = advantages.to(logp.device, torch.float32)
    ref = rollout.ref_logp if beta != 0 else None
    loss, stats = lm_grpo_loss(logp, rollout.old_logp, ref, adv, rollout.mask, clip_eps, beta)
    out |= {k: float(v) for k, v in stats.items()}
    out["completion_len"] = float(rollout.mask.sum(dim=1).mean())
    out["eos_fraction"] = sum(rollout.finished) / max(len(rollout.finished), 1)
    return loss, out


def score_rewards(weights: Mapping[str, float], texts: Sequence[str], images: Sequence[Image.Image] | None,
                  prompts: Sequence[str], metas: Sequence[Mapping[str, Any]],
                  text_rewards: frozenset[str] = TEXT_REWARDS) -> tuple[Tensor, dict[str, list[float]]]:
    """Weighted rewards of a mixed LM + DM sample: ``text_rewards`` on the completions, the others on the images.

    Returns ``(total (B,), {reward: B raw values})`` as :func:`unirl.rewards.registry.combine` does; an image
    reward configured without images is an error naming it.
    """
    text_w = {k: v for k, v in weights.items() if k in text_rewards}
    image_w = {k: v for k, v in weights.items() if k not in text_rewards}
    if image_w and images is None:
        raise ValueError(f"reward(s) {sorted(image_w)} score images, but this scenario produced none; "
                         f"use text rewards {sorted(text_rewards)} only")
    total = torch.zeros(len(texts), dtype=torch.float32)  # (B,)
    parts: dict[str, list[float]] = {}
    for w, samples in ((text_w, texts), (image_w, images)):
        if w:
            t, p = combine(w, list(samples), list(prompts), list(metas))
            total += torch.tensor(t, dtype=torch.float32)
            parts |= p
    if not parts:
        raise ValueError("no rewards configured (rl.rewards is empty)")
    return total, parts
