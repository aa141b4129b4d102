"""DM policy of the GRPO engine: Flow-GRPO SDE rollouts with stored transitions, and their batched replay.

Variant implemented (DESIGN.md section 1, "DM side"):

* **Conditioning once per prompt.** The LM + connector run once per conditioning unit (a prompt, or for the
  reverse edit a sample) and the result is repeated ``repeat`` (= G) times; the same holds in the replay, where
  the conditioning is recomputed WITH gradient (it reaches the connector and the queries through the frozen LM).
* **Rollout** (:func:`dm_rollout`, no grad): ``x_0 ~ N(0, I)``, then for each of the ``steps`` shifted sigmas a
  CFG-combined velocity (:meth:`UnifiedModel.guided_velocity`: ``v_u + w (v_c - v_u)`` with the zeroed connector
  output as ``v_u``, only at sigma <= the model's ``sampling.cfg_max_sigma``, the t2i guidance interval; for
  editing the triple form with the noised reference latents at every step) and either an SDE step
  (:func:`~unirl.rl.flow_sde.sde_step`, steps in the window) or an ODE Euler step (elsewhere; Flow-GRPO-Fast /
  MixGRPO). Each SDE step stores ``(x_k, x_{k+1}, sigma_k, sigma_{k+1}, log p)``; the noised reference latents are
  stored too, so the loss sees exactly the rollout's inputs.
* **Replay** (:func:`replay`, with grad): all ``B * W`` stored transitions (every sample x every window step, of
  one or several rollouts, e.g. the forward and reverse edits) are stacked along the batch and go through ONE
  batched CFG DiT pass (with a guidance interval: one conditional pass over all of them plus an unconditional
  pass over the transitions inside the interval); the transition means give the log-probs
  (:func:`~unirl.rl.flow_sde.sde_log_prob`). With ``beta > 0`` the frozen reference model computes its means at
  the same inputs under ``no_grad`` and the KL is Flow-GRPO's ``mean((mu - mu_ref)^2 / (2 s_k^2))``
  (:func:`~unirl.rl.flow_sde.dm_kl`: the step's Gaussian KL times ``-Delta_k``, kept so the paper's beta values
  transfer). :func:`replay_step` replays one window step (the per-step loop of the reference code; the benchmark
  compares both). Where the one pass does not fit (full scale at 1024 px), ``chunk`` runs it as checkpointed
  chunks: the same numbers, one chunk's activations.
* **Loss** (:func:`dm_loss`): :func:`~unirl.rl.flow_sde.dm_grpo_loss` (PPO clip on per-step ratios + beta KL)
  with each sample's advantage on each of its steps. Same CFG scales, steps, conditioning and reference latents
  as the rollout, so the first update's ratio is 1 up to float error (tested to 1e-5).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from unirl.rl.flow_sde import dm_grpo_loss, dm_kl, ode_step, sde_log_prob, sde_mean_std, sde_noise_scale, sde_step
from unirl.rl.flow_sde import sde_window as choose_window

if TYPE_CHECKING:  # pragma: no cover
    from unirl.models.outputs import Conditioning
    from unirl.models.unified import UnifiedModel
    from unirl.rl.trainer import RLConfig

__all__ = ["DMRollout", "DMSampling", "ReplayResult", "dm_loss", "dm_rollout", "ode_images", "replay", "replay_step",
           "sample_ode", "seeded_noise"]


@dataclass
class DMSampling:
    """How the DM samples: identical in rollout and loss by construction (one object feeds both)."""

    steps: int = 10
    noise_level: float = 0.7
    cfg_scale: float = 3.0
    ref_cfg_scale: float = 1.5
    window_size: int = 0  # 0 = every step is SDE
    window_mode: str = "random"
    window_range: tuple[int, int] | None = None
    shared_noise: bool = False  # the G samples of a conditioning unit start from the same x_0 (DanceGRPO)

    @classmethod
    def from_config(cls, cfg: RLConfig, model: UnifiedModel) -> DMSampling:
        s = model.config.sampling
        rng = tuple(cfg.sde_window_range) if cfg.sde_window_range else None
        return cls(steps=cfg.sde_steps, noise_level=cfg.noise_level,
                   cfg_scale=s.cfg_scale if cfg.cfg_scale is None else float(cfg.cfg_scale),
                   ref_cfg_scale=s.ref_cfg_scale if cfg.ref_cfg_scale is None else float(cfg.ref_cfg_scale),
                   window_size=cfg.sde_window_size, window_mode=cfg.sde_window_mode, window_range=rng,
                   shared_noise=cfg.sde_shared_noise)

    def window(self, generator: torch.Generator) -> list[int]:
        """The SDE step indices of one rollout (drawn from ``generator`` in random mode)."""
        size = self.window_size or (self.window_range[1] - self.window_range[0] if self.window_range else self.steps)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        return choose_window(self.steps, size, random.Random(seed), self.window_mode, self.window_range)


@dataclass
class DMRollout:
    """Stored DM trajectories of ``B = n_units * repeat`` samples, ``W`` SDE (window) steps each."""

    x: Tensor  # (B, W, C, H, W) latents entering each SDE step
    x_next: Tensor  # (B, W, C, H, W) sampled latents after it
    sigma: Tensor  # (W,) sigma_k of each window step
    sigma_next: Tensor  # (W,) sigma_{k+1}
    log_prob: Tensor  # (B, W) rollout log-probs (mean over latent dims)
    final: Tensor  # (B, C, H, W) final latents (sigma = 0)
    window: list[int]  # step indices of the W SDE steps
    ref_latents: Tensor | None  # (B, C, H, W) the NOISED reference latents used at every step (editing), or None
    texts: list[str]  # n_units prompts / instructions the conditioning is encoded from
    images: list | None  # n_units images for the LM's vision tower (editing), or None
    task: str  # "t2i" or "i2i": which query set
    repeat: int  # samples per conditioning unit (G per prompt; 1 for per-sample conditioning)
    sampling: DMSampling
    prefix_ids: list | None = None  # n_units token-id lists after the prompt (t2i_cot: the LM's completion), or None

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]


def seeded_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """One ``N(0, I)`` tensor of ``shape`` per seed (CPU generators): (len(seeds), *shape), batch-independent."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def _reference(model: UnifiedModel, ref_images: Sequence[Any] | None, repeat: int,
               generator: torch.Generator) -> Tensor | None:
    if ref_images is None:
        return None
    ref = model.encode_images(ref_images).repeat_interleave(repeat, 0)  # (B, C, H, W)
    eps = torch.randn(ref.shape, generator=generator).to(ref.device, ref.dtype)
    return 0.8 * ref + 0.2 * eps  # UnifiedModel.noise_reference with the rollout's generator


@torch.no_grad()
def dm_rollout(model: UnifiedModel, texts: Sequence[str], images: Sequence[Any] | None, task: str, repeat: int,
               sampling: DMSampling, generator: torch.Generator, ref_images: Sequence[Any] | None = None,
               window: list[int] | None = None, cond: Conditioning | None = None,
               prefix_ids: Sequence[Sequence[int]] | None = None) -> DMRollout:
    """SDE rollout of ``repeat`` samples per text (B = len(texts) * repeat), storing the window transitions.

    ``images`` feed the LM's vision tower (editing), ``ref_images`` the DiT's reference path (editing: the same
    source images); ``prefix_ids`` (one id list per text) follow the prompt before the queries (``t2i_cot``: the
    LM's completion); ``window`` defaults to ``sampling.window(generator)``; ``cond`` skips the encoding (it must be
    what ``model.encode`` gives for these inputs, since the replay re-encodes them).
    """
    n = len(texts)
    prefix = [list(p) for p in prefix_ids] if prefix_ids is not None else None
    if cond is None:
        cond = model.encode(list(texts), list(images) if images is not None else None, task, prefix)  # (n, N, D)
    cond_b = cond.repeat_interleave(repeat)  # (B, N, D)
    B = n * repeat
    ref = _reference(model, ref_images, repeat, generator)  # (B, C, H, W) | None
    if window is None:
        window = sampling.window(generator)
    if sampling.shared_noise:  # one x_0 per unit: reward differences within a group come from the SDE steps only
        x = torch.randn((n, *model.latent_shape), generator=generator).repeat_interleave(repeat, 0)  # (B, C, H, W)
    else:
        x = torch.randn((B, *model.latent_shape), generator=generator)  # (B, C, H, W)
    x = x.to(model.device, torch.float32)
    sigmas = model.scheduler.sigmas(sampling.steps, device=model.device)  # (T + 1,)
    xs, xns, lps = [], [], []
    in_window = set(window)
    for k in range(sampling.steps):
        v = model.guided_velocity(x, sigmas[k], cond_b, ref, sampling.cfg_scale, sampling.ref_cfg_scale)
        if k in in_window:
            x_next, lp, _, _ = sde_step(x, v, sigmas[k], sigmas[k + 1], sampling.noise_level, generator=generator)
            xs.append(x)
            xns.append(x_next)
            lps.append(lp)
        else:
            x_next = ode_step(x, v.float(), sigmas[k], sigmas[k + 1])
        x = x_next.float()
    w = torch.tensor(window, device=sigmas.device)
    return DMRollout(
        x=torch.stack(xs, 1), x_next=torch.stack(xns, 1), sigma=sigmas[w], sigma_next=sigmas[w + 1],  # (B, W, ...)
        log_prob=torch.stack(lps, 1), final=x, window=list(window), ref_latents=ref, texts=list(texts),
        images=list(images) if images is not None else None, task=task, repeat=repeat, sampling=sampling,
        prefix_ids=prefix,
    )


@dataclass
class ReplayResult:
    log_prob: Tensor  # (sum B, W) recomputed log-probs, with grad
    kl: Tensor | None  # (sum B, W) Flow-GRPO KL to the reference, or None (beta = 0)


def _check_same_sampling(rollouts: Sequence[DMRollout]) -> DMSampling:
    s = rollouts[0].sampling
    W = rollouts[0].x.shape[1]
    for r in rollouts[1:]:
        if (r.sampling.cfg_scale, r.sampling.ref_cfg_scale, r.sampling.noise_level) != (
                s.cfg_scale, s.ref_cfg_scale, s.noise_level) or r.x.shape[1] != W:
            raise ValueError("replay: rollouts batched together need the same CFG scales, noise level and window size")
        if (r.ref_latents is None) != (rollouts[0].ref_latents is None):
            raise ValueError("replay: rollouts batched together must all have reference latents or none")
    return s


def _conditioning(model: UnifiedModel, rollouts: Sequence[DMRollout], per: int) -> Conditioning:
    """Each rollout's conditioning, encoded once per unit, repeated ``repeat * per`` times, concatenated."""
    from unirl.models.outputs import Conditioning

    return Conditioning.cat([model.encode(r.texts, r.images, r.task, r.prefix_ids).repeat_interleave(r.repeat * per)
                             for r in rollouts])


def _means(model: UnifiedModel, rollouts: Sequence[DMRollout], x: Tensor, sig: Tensor, sig_n: Tensor,
           ref: Tensor | None, per: int, chunk: int = 0) -> tuple[Tensor, Tensor]:
    """Transition mean (N, C, H, W) and std (N, 1, 1, 1) of the stacked transitions under ``model``.

    ``chunk`` > 0 runs the DiT on ``chunk`` transitions at a time; with grad, each chunk is checkpointed (only its
    inputs and its velocity are kept; backward recomputes it), so activation memory follows the chunk, not G*T.
    """
    s = rollouts[0].sampling
    cond = _conditioning(model, rollouts, per)

    def velocity(sl: slice) -> Tensor:
        return model.guided_velocity(x[sl], sig[sl], cond.index(sl), None if ref is None else ref[sl], s.cfg_scale,
                                     s.ref_cfg_scale)

    if chunk <= 0 or chunk >= len(x):
        v = velocity(slice(None))  # (N, C, H, W)
    else:
        run = (lambda sl: checkpoint(velocity, sl, use_reentrant=False)) if torch.is_grad_enabled() else velocity
        v = torch.cat([run(slice(i, i + chunk)) for i in range(0, len(x), chunk)])  # (N, C, H, W)
    return sde_mean_std(x, v, sig, sig_n, s.noise_level)


def _replay(model: UnifiedModel, ref_model: UnifiedModel | None, rollouts: Sequence[DMRollout],
            steps: slice, chunk: int = 0) -> ReplayResult:
    s = _check_same_sampling(rollouts)
    W = len(range(*steps.indices(rollouts[0].x.shape[1])))
    x = torch.cat([r.x[:, steps].flatten(0, 1) for r in rollouts])  # (N = sum B * W, C, H, W), sample-major
    x_next = torch.cat([r.x_next[:, steps].flatten(0, 1) for r in rollouts])  # (N, C, H, W)
    sig = torch.cat([r.sigma[steps].repeat(r.batch_size) for r in rollouts])  # (N,)
    sig_n = torch.cat([r.sigma_next[steps].repeat(r.batch_size) for r in rollouts])  # (N,)
    ref = None
    if rollouts[0].ref_latents is not None:
        ref = torch.cat([r.ref_latents.repeat_interleave(W, 0) for r in rollouts])  # (N, C, H, W)
    mean, std = _means(model, rollouts, x, sig, sig_n, ref, W, chunk)  # (N, C, H, W), (N, 1, 1, 1)
    log_prob = sde_log_prob(x_next, mean, std).view(-1, W)  # (sum B, W)
    kl = None
    if ref_model is not None:
        with torch.no_grad():
            ref_mean = _means(ref_model, rollouts, x, sig, sig_n, ref, W, chunk)[0]
        kl = dm_kl(mean, ref_mean, sde_noise_scale(sig, sig_n, s.noise_level)).view(-1, W)  # (sum B, W)
    return ReplayResult(log_prob, kl)


def replay(model: UnifiedModel, rollouts: Sequence[DMRollout], ref_model: UnifiedModel | None = None,
           chunk: int = 0) -> ReplayResult:
    """Recompute log-probs of ALL stored transitions of ``rollouts`` in one batched CFG DiT pass (with grad).

    Rows follow the rollouts' order (forward then reverse, ...), each rollout's samples in order; columns are the
    window steps. With ``ref_model`` the KL to its means at the same inputs is returned too. ``chunk`` > 0 splits
    the pass into checkpointed chunks of that many transitions (same results, memory of one chunk; see ``_means``).
    """
    if chunk < 0:
        raise ValueError(f"replay: chunk (rl.replay_chunk) must be >= 0 transitions, 0 = one pass; got {chunk}")
    return _replay(model, ref_model, rollouts, slice(None), chunk)


def replay_step(model: UnifiedModel, rollouts: Sequence[DMRollout], step: int,
                ref_model: UnifiedModel | None = None) -> ReplayResult:
    """Replay window step ``step`` only (the per-step loop of the reference code): (sum B, 1) results."""
    return _replay(model, ref_model, rollouts, slice(step, step + 1))


def dm_loss(model: UnifiedModel, ref_model: UnifiedModel | None, rollouts: Sequence[DMRollout],
            advantages: Sequence[Tensor], clip_eps: float, beta: float,
            update_index: int = 0, chunk: int = 0) -> tuple[Tensor, dict[str, float]]:
    """Flow-GRPO loss over every stored transition of ``rollouts`` (advantages: one (B_r,) tensor per rollout).

    Stats: ``policy_loss``, ``kl``, ``clip_fraction``, ``ratio_mean``, ``ratio_max_dev``, ``approx_kl_old`` and, on
    update 0, ``logprob_gap`` = mean |rollout log-prob - recomputed log-prob| (0 up to float error).
    """
    if len(advantages) != len(rollouts):
        raise ValueError(f"dm_loss: {len(rollouts)} rollouts but {len(advantages)} advantage tensors")
    res = replay(model, rollouts, ref_model if beta != 0 else None, chunk)
    old = torch.cat([r.log_prob for r in rollouts]).to(res.log_prob.device)  # (sum B, W)
    adv = torch.cat([a.to(res.log_prob.device) for a in advantages])  # (sum B,)
    loss, stats = dm_grpo_loss(res.log_prob, old, adv, clip_eps, beta, res.kl)
    out = {k: float(v) for k, v in stats.items()}
    if update_index == 0:
        out["logprob_gap"] = float((res.log_prob.detach() - old).abs().mean())
    return loss, out


@torch.no_grad()
def sample_ode(model: UnifiedModel, texts: Sequence[str], images: Sequence[Any] | None, task: str,
               seeds: Sequence[int], sampling: DMSampling, ref_images: Sequence[Any] | None = None,
               steps: int | None = None, prefix_ids: Sequence[Sequence[int]] | None = None) -> Tensor:
    """Deterministic evaluation sampling: Euler ODE with the rollout's CFG, one seed per sample (B = len(texts)).

    The initial noise and the reference noise of sample ``i`` come from ``seeds[i]`` alone, so results do not
    depend on the batch composition. Returns the final latents (B, C, H, W).
    """
    prefix = [list(p) for p in prefix_ids] if prefix_ids is not None else None
    cond = model.encode(list(texts), list(images) if images is not None else None, task, prefix)  # (B, N, D)
    shape = model.latent_shape
    x = seeded_noise(shape, seeds).to(model.device)  # (B, C, H, W)
    ref = None
    if ref_images is not None:
        src = model.encode_images(ref_images)  # (B, C, H, W)
        eps = seeded_noise(shape, [s + 7_919 for s in seeds]).to(src.device, src.dtype)  # (B, C, H, W)
        ref = 0.8 * src + 0.2 * eps
    n = steps or sampling.steps
    sigmas = model.scheduler.sigmas(n, device=model.device)  # (n + 1,)
    for k in range(n):
        v = model.guided_velocity(x, sigmas[k], cond, ref, sampling.cfg_scale, sampling.ref_cfg_scale)
        x = ode_step(x, v.float(), sigmas[k], sigmas[k + 1])
    return x


def ode_images(model: UnifiedModel, texts: Sequence[str], seeds: Sequence[int], sampling: DMSampling,
               batch_size: int, sources: Sequence[Any] | None = None, steps: int | None = None,
               prefix_ids: Sequence[Sequence[int]] | None = None) -> list:
    """Decoded :func:`sample_ode` images of ``texts`` (seed ``seeds[i]`` for text i), in batches of ``batch_size``.

    ``sources`` (one image per text) are edited: they feed the vision tower and the reference path (task ``i2i``);
    without them the task is ``t2i``. ``prefix_ids`` follow each prompt before the queries (``t2i_cot``).
    """
    task = "t2i" if sources is None else "i2i"
    images: list = []
    bs = max(1, batch_size)
    for i in range(0, len(texts), bs):
        src = list(sources[i : i + bs]) if sources is not None else None
        prefix = prefix_ids[i : i + bs] if prefix_ids is not None else None
        latents = sample_ode(model, list(texts[i : i + bs]), src, task, list(seeds[i : i + bs]), sampling,
                             ref_images=src, steps=steps, prefix_ids=prefix)
        images += model.decode_latents(latents)
    return images
