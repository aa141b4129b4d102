"""The GRPO loop shared by all six scenarios: rollout -> score -> advantages -> inner updates, with monitors.

Variant implemented (the loop; the maths live in :mod:`unirl.rl.grpo`, :mod:`unirl.rl.flow_sde` and the scenario):

* **Policy and reference.** The policy is loaded from ``init_dir`` (a ``save_pretrained`` directory, the SFT
  model); the reference is a frozen copy of that same model (never updated, as in GRPO and Flow-GRPO).
* **One step** = ``prompts_per_step`` prompts per process, drawn from the scenario's train shards with a seed of
  (seed, step, rank), ``group_size`` samples each (rollout under ``no_grad`` with a CPU generator of the same
  seed), rewards, group-normalised advantages, then ``inner_updates`` optimiser updates on that batch (1 =
  on-policy; the first update's ratio is 1). Every sample's randomness depends only on (seed, step, rank), so a
  run resumed from a checkpoint reproduces the uninterrupted one.
* **Failures.** A reward that raises or returns NaN stops the run (``RewardError`` names it). A NaN/Inf loss skips
  the step's update (no optimiser step, on every rank) and the run stops with a clear error once
  ``max_nan_steps`` steps were skipped.
* **Budget.** ``steps`` optimiser steps, or fewer: with ``max_minutes`` > 0 the loop stops when the elapsed time
  plus the time the final evaluation will take (measured by the first one) would exceed it. Checkpoints carry the
  time spent so far, and a resumed run counts it: a run the clock stopped, rerun with the same settings (e.g. by
  `dvc repro` after a code change), evaluates again instead of training past its budget.
* **Weight average.** With ``ema_decay`` > 0 the trained parameters are averaged after every step
  (:class:`unirl.train.ema.WeightEMA`, ``ema_warmup`` off by default: the average starts at the initial policy);
  the "after" evaluation, the grid and the saved model use the average, the checkpoints hold iterate and average
  (a resume is exact). Flow-GRPO evaluates an EMA of its policy as well; the paper does not say. Why: a run's
  held-out score moves by +-0.03 from one 10-step checkpoint to the next (docs/results.md, ``t2i_cot``), so the
  last iterate is a noisy pick of where the wall-clock budget happens to stop.
* **Outputs.** Held-out ``evaluate`` before and after (the mean over ``eval_seeds`` sampling seeds: with one
  image per prompt, one seed's score on 60 prompts swings by ~0.1 from seed to seed); the final model
  (``save_pretrained`` in ``out_dir``); ``metrics.json`` (before/after/delta per metric), ``reward_curve.csv`` (DVC
  plots) + ``.png`` and a before/after sample grid (same prompts, same seeds: the reference model is the "before"
  model; :mod:`unirl.rl.report`) in ``reports_dir``; checkpoints (``save_training_checkpoint``, logged to MLflow)
  in ``run_dir``. Prompts come from :mod:`unirl.rl.prompts`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unirl.atomic import atomic_write_json
from unirl.config import from_dict, load_params, merge_overrides, option, to_dict
from unirl.rl.prompts import load_prompts, sample_prompts
from unirl.rl.report import before_after_grid, step_metrics, write_reward_curve
from unirl.rl.scenario import Scenario, get_scenario
from unirl.train.checkpoint import CheckpointError, inputs_digest
from unirl.train.ema import WeightEMA
from unirl.train.engine import EngineConfig

__all__ = ["RLConfig", "derive_seed", "evaluate_seeds", "load_rl_config", "run_rl", "train_rl"]


@dataclasses.dataclass
class RLConfig:
    """GRPO stage config: params.yaml section ``rl``, overridden per scenario by ``rl.scenarios.<name>``."""

    # --- run ---
    scenario: str = option("t2i", "scenario: understand, t2i, t2i_cot, edit, prompt_refine, reflect")
    profile: str = option("tiny", "model profile (informational: the architecture comes from init_dir)")
    init_dir: str = option("data/models/sft", "save_pretrained directory of the initial policy (= the reference)")
    shards_dir: str = option("data/shards", "shard root: prompts from <shards_dir>/<task>/{train,test}-*.tar")
    out_dir: str = option("", "final model (save_pretrained); empty: data/models/rl_<scenario>")
    reports_dir: str = option("", "metrics.json, reward curve, sample grid; empty: data/reports/rl_<scenario>")
    run_dir: str = option("", "training checkpoints (resume from the latest); empty: data/runs/rl_<scenario>/<hash "
                              "of the settings, init_dir and shards_dir>")
    seed: int = option(0, "seed: prompts and noise of step s on rank r derive from (seed, s, r)")
    processes: int = option(1, "local data-parallel processes: >1 relaunches `unirl rl` under `torchrun --standalone` "
                               "(prompts_per_step is per process); an outside launcher's world size overrides it")
    # --- budget ---
    steps: int = option(40, "GRPO steps (one rollout batch each)")
    max_minutes: float = option(0.0, "wall-clock budget incl. evaluation; the loop stops early to meet it (0 = off)")
    prompts_per_step: int = option(4, "prompts per step per process (P)")
    group_size: int = option(4, "samples per prompt (G); advantages are normalised within each group")
    inner_updates: int = option(1, "optimiser updates per rollout batch (1 = on-policy)")
    balance_tags: bool = option(True, "draw each step's prompts evenly over the task tags (else uniformly)")
    # --- optimiser (per expert) ---
    lr_lm: float = option(1e-5, "learning rate of the LM expert (lm + vision tower)")
    lr_dm: float = option(1e-4, "learning rate of the DM side (DiT, connector, queries, reference path)")
    engine: EngineConfig = dataclasses.field(default_factory=EngineConfig)
    ema_decay: float = option(0.0, "EMA of the trained weights after every step (unirl.train.ema); the after-"
                                   "evaluation and the saved model use it, checkpoints keep both; 0 = last iterate")
    ema_warmup: bool = option(False, "EMA bias warm-up min(decay, (1+t)/(10+t)); off: the decay from step 1, so the "
                                     "average starts at the initial policy")
    gradient_checkpointing: bool = option(False, "recompute DiT blocks in backward (full scale: G*T replay fits)")
    replay_chunk: int = option(0, "transitions per DiT pass in the DM loss replay, each chunk recomputed in "
                                  "backward; 0 = all G*T in one pass (full scale at 1024 px needs chunks)")
    # --- loss ---
    clip_eps_lm: float = option(0.2, "PPO clip range of the LM token ratios")
    clip_eps_dm: float = option(1e-3, "PPO clip range of the DM step ratios (per-dimension log-probs: small)")
    beta_lm: float = option(0.01, "weight of the k3 KL to the reference (LM)")
    beta_dm: float = option(0.004, "weight of Flow-GRPO's KL term mean((mu - mu_ref)^2 / (2 s^2)) (DM)")
    # --- DM sampling (SDE rollout) ---
    noise_level: float = option(0.7, "SDE noise level a: s_k = a sqrt(sigma_k / (1 - sigma_k))")
    sde_steps: int = option(10, "sampling steps of the rollout (and of the replayed transitions)")
    sde_window_size: int = option(0, "SDE (trained) steps per rollout, ODE elsewhere; 0 = all steps")
    sde_window_mode: str = option("random", "'random' (start drawn per step) or 'fixed' (start = range start)")
    sde_window_range: list = option([], "[lo, hi): steps the window may cover; empty = all")
    sde_shared_noise: bool = option(False, "the G samples of a prompt share x_0 (only the SDE steps differ)")
    cfg_scale: float | None = option(None, "text CFG scale in rollout AND loss; null = the model's sampling.cfg_scale")
    ref_cfg_scale: float | None = option(None, "reference CFG scale (editing); null = the model's ref_cfg_scale")
    # --- LM sampling ---
    temperature: float = option(1.0, "LM sampling temperature (log-probs use the same)")
    max_new_tokens: int = option(48, "LM completion length limit")
    # --- rewards ---
    rewards: dict = option({"geneval": 1.0}, "reward name -> weight (unirl.rewards registry)")
    reward_kwargs: dict = option({}, "reward name -> options (e.g. clip_similarity: {model_path: ...})")
    # --- evaluation ---
    eval_prompts: int = option(60, "held-out prompts (test split, N balanced over tags) for evaluate before/after")
    eval_seed: int = option(1234, "sampling seed of the evaluation (fixed: before and after see the same noise)")
    eval_seeds: int = option(1, "evaluation repeats with seeds eval_seed, eval_seed + 1, ...: metrics are their "
                             "mean (one image per prompt and seed; GenEval draws 4 per prompt)")
    eval_steps: int = option(0, "ODE steps of evaluation sampling; 0 = sde_steps")
    eval_batch_size: int = option(32, "prompts per evaluation batch")
    grid_prompts: int = option(8, "prompts in the before/after sample grid")
    # --- checkpoints and monitoring ---
    checkpoint_every: int = option(0, "save a training checkpoint every N steps (0 = only at the end)")
    keep_checkpoints: int = option(2, "keep the last N checkpoints")
    max_nan_steps: int = option(3, "stop after this many steps skipped for a NaN/Inf loss")
    tracking: bool = option(True, "log to MLflow (rank 0)")
    experiment: str = option("", "MLflow experiment; empty: rl_<scenario>")
    torch_threads: int = option(0, "torch intra-op threads per process (0 = torch's default)")
    progress: bool = option(True, "tqdm progress bar over steps (rank 0)")

    def with_outputs(self) -> RLConfig:
        """A copy with the empty output paths (model, reports, experiment) filled in from the scenario name."""
        cfg = copy.deepcopy(self)
        cfg.out_dir = cfg.out_dir or f"data/models/rl_{cfg.scenario}"
        cfg.reports_dir = cfg.reports_dir or f"data/reports/rl_{cfg.scenario}"
        cfg.experiment = cfg.experiment or f"rl_{cfg.scenario}"
        return cfg

    def resolved(self) -> RLConfig:
        """:meth:`with_outputs` plus the run directory, which hashes the input data (reads init_dir and shards)."""
        cfg = self.with_outputs()
        if not cfg.run_dir:
            # One run directory per training configuration and input data: a rerun with the same settings and
            # inputs resumes its checkpoints; other settings (e.g. `dvc repro` after a params.yaml change) or a new
            # initial model or prompt set start a fresh run.
            signature = {k: v for k, v in to_dict(cfg).items() if k not in RESUMABLE_CHANGES}
            inputs = inputs_digest([cfg.init_dir, cfg.shards_dir])
            blob = json.dumps([signature, inputs], sort_keys=True, default=str).encode()
            digest = hashlib.sha256(blob).hexdigest()[:12]
            cfg.run_dir = f"data/runs/rl_{cfg.scenario}/{digest}"
        return cfg


def _merge(base: dict, over: dict) -> dict:
    """Nested merge for config dicts (``engine`` merges key by key; other dicts, e.g. ``rewards``, are replaced)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = {**out[k], **v} if k == "engine" and isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_rl_config(
    scenario: str, params_path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None
) -> RLConfig:
    """``params.yaml`` section ``rl`` + ``rl_scenarios.<scenario>`` + ``overrides`` -> :class:`RLConfig`.

    The per-scenario overrides live in their own top-level section so that DVC tracks each scenario's stage
    parameters separately (changing ``rl_scenarios.t2i`` reruns only ``rl@t2i``); ``rl.scenarios`` is also accepted.
    """
    params = load_params(params_path)
    section = dict(params.get("rl") or {})
    per = section.pop("scenarios", None) or params.get("rl_scenarios") or {}
    if not isinstance(per, dict):
        raise ValueError("params section rl_scenarios must map scenario names to override mappings")
    values = _merge(section, dict(per.get(scenario) or {}))
    values = merge_overrides(values, overrides)
    values["scenario"] = scenario
    if "profile" not in values and "profile" in params:
        values["profile"] = params["profile"]
    return from_dict(RLConfig, values, f"rl (scenario {scenario})")


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (seed, step, rank, ...): stable across runs, processes and Python versions."""
    digest = hashlib.sha256(json.dumps([int(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------ helpers
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_mean(metrics: dict[str, float]) -> dict[str, float]:
    """Average each scalar over the ranks that report it (ranks may log different keys, e.g. data-dependent)."""
    _, world = _world()
    if world == 1:
        return metrics
    gathered: list[dict[str, float] | None] = [None] * world
    dist.all_gather_object(gathered, {k: float(v) for k, v in metrics.items()})
    keys = sorted({k for g in gathered for k in g})
    return {k: sum(g[k] for g in gathered if k in g) / sum(k in g for g in gathered) for k in keys}


def _all_min(flag: float) -> float:
    _, world = _world()
    if world == 1:
        return flag
    t = torch.tensor([flag], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return float(t.item())


def _digest(named: list[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, bytes) of the given parameters (every rank of a data-parallel run must agree)."""
    h = hashlib.sha256()
    for name, p in sorted(named, key=lambda t: t[0]):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _stat(v: Any) -> float:
    return float(v.detach().float().item()) if isinstance(v, torch.Tensor) else float(v)


# ------------------------------------------------------------------------------------------------ the loop
def evaluate_seeds(scenario: Scenario, model: Any, prompts: list[dict], cfg: RLConfig) -> dict[str, float]:
    """``scenario.evaluate`` averaged over ``cfg.eval_seeds`` seeds from ``cfg.eval_seed`` (one for deterministic
    scenarios); with several, ``<headline>/seed_std`` is the spread of the headline metric across the seeds."""
    if cfg.eval_seeds < 1:
        raise ValueError(f"rl.eval_seeds must be >= 1, got {cfg.eval_seeds}")
    n = cfg.eval_seeds if getattr(scenario, "eval_uses_seed", True) else 1
    runs = [scenario.evaluate(model, prompts, cfg.eval_seed + k) for k in range(n)]
    out = {k: sum(r[k] for r in runs) / n for k in runs[0]}
    if n > 1:
        head = next(iter(runs[0]))
        out[f"{head}/seed_std"] = float(torch.tensor([r[head] for r in runs], dtype=torch.float64).std())
    return out


def train_rl(cfg: RLConfig, scenario: Scenario | None = None) -> dict[str, Any]:
    """Run GRPO for ``cfg.scenario`` (or the given ``scenario`` object); returns a summary dict (see module doc)."""
    from unirl.eval.grid import save_image_atomic
    from unirl.models.unified import UnifiedModel
    from unirl.progress import progress_bar
    from unirl.rewards import image as image_rewards
    from unirl.tracking import data_version, make_tracker
    from unirl.train.checkpoint import resume_training, save_training_checkpoint
    from unirl.train.distributed import default_device, init_distributed
    from unirl.train.engine import build_engine

    cfg = cfg.resolved()
    if cfg.group_size < 2:
        raise ValueError(f"rl.group_size must be >= 2 (advantages are normalised within groups), got {cfg.group_size}")
    if min(cfg.inner_updates, cfg.prompts_per_step, cfg.processes) < 1:
        raise ValueError("rl.inner_updates, rl.prompts_per_step and rl.processes must be >= 1")
    if cfg.eval_seeds < 1:
        raise ValueError(f"rl.eval_seeds must be >= 1 (evaluation repeats), got {cfg.eval_seeds}")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ValueError(f"rl.ema_decay must be in [0, 1) (0 = no weight average), got {cfg.ema_decay}")
    if cfg.replay_chunk < 0:
        raise ValueError(f"rl.replay_chunk must be >= 0 (0 = all transitions in one pass), got {cfg.replay_chunk}")
    t_start = time.perf_counter()
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    for name, kwargs in cfg.reward_kwargs.items():
        image_rewards.configure(name, **kwargs)
    info = init_distributed(require_group=cfg.engine.backend == "deepspeed")
    rank, world = _world()
    scenario = scenario or get_scenario(cfg.scenario, cfg)
    device = default_device(info)
    torch.manual_seed(derive_seed(cfg.seed, -1, rank))
    model = UnifiedModel.from_pretrained(cfg.init_dir, device=device)
    ref_model = copy.deepcopy(model).requires_grad_(False).eval()
    if cfg.gradient_checkpointing:
        model.dit.enable_gradient_checkpointing()
    groups = scenario.param_groups(model)
    engine = build_engine(model, groups, cfg.engine)
    model = engine.module
    ema = WeightEMA(engine.trainable, cfg.ema_decay, warmup=cfg.ema_warmup) if cfg.ema_decay > 0 else None
    model.eval()  # no dropout anywhere: the loss must see exactly the rollout's computation (gradients still flow)
    train_prompts = load_prompts(cfg.shards_dir, scenario.data_task, "train")
    eval_prompts = load_prompts(cfg.shards_dir, scenario.data_task, "test", limit=cfg.eval_prompts)

    dvc_version = data_version("dvc.lock", cfg.shards_dir)
    tracker = make_tracker(cfg.experiment, enabled=cfg.tracking, is_main=rank == 0)
    tracker.start(f"rl_{cfg.scenario}_seed{cfg.seed}", params=to_dict(cfg),
                  tags={"stage": "rl", "scenario": cfg.scenario, "seed": str(cfg.seed),
                        "data_version": str(dvc_version), "init_version": str(data_version("dvc.lock", cfg.init_dir))})
    try:
        ckpt = resume_training(engine, cfg.run_dir)
        if ckpt is not None:
            start, extra = ckpt.step, ckpt.extra
            if start > cfg.steps:  # resuming would report (and save) a longer run than the one asked for
                raise CheckpointError(
                    f"{ckpt.path} is step {start} of a run, past rl.steps = {cfg.steps}: delete {cfg.run_dir} to "
                    f"train {cfg.steps} steps from the start, or set rl.steps >= {start} to continue it")
            _check_resume_config(extra.get("config", {}), to_dict(cfg), ckpt.path)
            history, before, eval_seconds = extra["history"], extra["eval_before"], extra["eval_seconds"]
            nan_steps = int(extra["nan_steps"])
            spent = float(extra.get("elapsed_s", 0.0))  # earlier invocations' time, counted by the budget
            if ema is not None:
                ema.load_state_dict(ckpt.stage_state.get("ema"), ckpt.path)
            print(f"[rl] resumed {cfg.scenario} from {ckpt.path} at step {start}", flush=True)
        else:
            start, history, nan_steps, spent = 0, [], 0, 0.0
            t0 = time.perf_counter()
            before = evaluate_seeds(scenario, model, eval_prompts, cfg)
            eval_seconds = time.perf_counter() - t0
            tracker.log_metrics({f"eval/{k}": v for k, v in before.items()}, step=0)

        def elapsed_s() -> float:
            """Seconds this run has taken, earlier invocations included (what the budget counts)."""
            return spent + time.perf_counter() - t_start

        def save(step: int) -> None:
            extra = {"config": to_dict(cfg), "history": history, "eval_before": before,
                     "eval_seconds": eval_seconds, "nan_steps": nan_steps,
                     "elapsed_s": elapsed_s()}
            path = save_training_checkpoint(engine, cfg.run_dir, step, extra=extra, keep_last=cfg.keep_checkpoints,
                                            stage_state={"ema": ema.state_dict()} if ema is not None else None)
            tracker.log_checkpoint(path, step, seed=cfg.seed, data_version=dvc_version)

        bar = progress_bar(range(start, cfg.steps), desc=f"rl {cfg.scenario}",
                           disable=rank != 0 or not cfg.progress, initial=start, total=cfg.steps)
        stopped_early = False
        # what still has to run after the loop: the final evaluation and the two grid previews (+ saving)
        repeats = cfg.eval_seeds if getattr(scenario, "eval_uses_seed", True) else 1
        final_s = eval_seconds * (1.0 + 2.0 * cfg.grid_prompts / max(1, len(eval_prompts) * repeats)) + 5.0
        for step in bar:
            last = history[-1]["time/step_s"] if history and "time/step_s" in history[-1] else 0.0
            over = cfg.max_minutes > 0 and elapsed_s() + last + final_s > cfg.max_minutes * 60
            if _all_min(0.0 if over else 1.0) == 0.0:
                stopped_early = True
                break
            row, skipped = _train_step(cfg, scenario, engine, model, ref_model, train_prompts, step, rank)
            if skipped:
                nan_steps += 1
                print(f"[rl] step {step}: non-finite loss, update skipped ({nan_steps}/{cfg.max_nan_steps})",
                      flush=True)
                if nan_steps >= cfg.max_nan_steps:
                    raise RuntimeError(
                        f"rl {cfg.scenario}: {nan_steps} steps had a NaN/Inf loss (rl.max_nan_steps = "
                        f"{cfg.max_nan_steps}); lower rl.lr_dm / rl.lr_lm or check the rewards, then resume from "
                        f"the last checkpoint in {cfg.run_dir}"
                    )
            elif ema is not None:
                ema.update()
            row = {"step": step + 1, **_all_mean(row)}
            history.append(row)
            tracker.log_metrics({k: v for k, v in row.items() if k != "step"}, step=step + 1)
            bar.set_postfix(reward=f"{row['reward/mean']:.3f}")
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
                save(step + 1)
        done = len(history)
        if done > start and (not cfg.checkpoint_every or done % cfg.checkpoint_every):
            save(done)
        state = engine.model_state_dict()  # collective (ZeRO: gathered); the trained values on every rank
        if ema is not None:  # training is over: the policy takes the average for evaluation and saving
            state = ema.averaged(state)
            model.load_state_dict(state)
        after = evaluate_seeds(scenario, model, eval_prompts, cfg)
        summary = {
            "scenario": cfg.scenario,
            "seed": cfg.seed,
            "steps": done,
            "stopped_early": stopped_early,
            "minutes": elapsed_s() / 60,  # every invocation of this run
            "before": before,
            "after": after,
            "delta": {k: after[k] - before[k] for k in after if k in before and not k.endswith("/seed_std")},
            "headline": next(iter(after)) if after else None,
            "nan_steps": nan_steps,
            "trainable_sha256": _digest([(n, state[n]) for n, _ in engine.trainable]),
        }
        if rank == 0:
            if cfg.engine.backend == "deepspeed":  # ZeRO's parameters are views of flat buffers: save a plain copy
                final = copy.deepcopy(ref_model)
                final.load_state_dict(state)
                final.save_pretrained(cfg.out_dir)
                del final
            else:
                model.save_pretrained(cfg.out_dir)
            reports = Path(cfg.reports_dir)
            atomic_write_json(reports / "metrics.json", summary, sort_keys=False)
            if history:
                fig = write_reward_curve(history, reports / "reward_curve.csv", reports / "reward_curve.png")
                tracker.log_figure(fig, "reward_curve")
                tracker.log_artifact(reports / "reward_curve.csv", "plots")
            grid = before_after_grid(scenario, ref_model, model, eval_prompts[: cfg.grid_prompts], cfg.eval_seed)
            if grid is not None:
                save_image_atomic(grid, reports / "samples_before_after.png")
                tracker.log_image(grid, "samples_before_after", step=done)
                summary["grid_path"] = str(reports / "samples_before_after.png")
            tracker.log_metrics({f"eval/{k}": v for k, v in after.items()}, step=done)
            tracker.log_dict(summary, "metrics.json")
            summary.update(out_dir=cfg.out_dir, reports_dir=cfg.reports_dir, run_url=tracker.run_url())
        tracker.finish()
        return summary
    except BaseException:
        tracker.finish("FAILED")
        raise


# Fields that may change between a run and its resume (budget, bookkeeping); any other change is an error.
RESUMABLE_CHANGES = frozenset({"steps", "max_minutes", "tracking", "progress", "checkpoint_every", "keep_checkpoints",
                               "torch_threads", "eval_batch_size", "max_nan_steps", "experiment"})


def _check_resume_config(saved: dict[str, Any], current: dict[str, Any], path: Path) -> None:
    diff = sorted(k for k in set(saved) | set(current)
                  if k not in RESUMABLE_CHANGES and saved.get(k) != current.get(k))
    if diff:
        shown = {k: (saved.get(k), current.get(k)) for k in diff[:5]}
        raise CheckpointError(
            f"cannot resume from {path}: it was written with a different rl config ({shown}, as (saved, now)); "
            "delete the run directory to start afresh, set rl.run_dir to another one, or restore those values"
        )


def _train_step(cfg: RLConfig, scenario: Scenario, engine: Any, model: Any, ref_model: Any,
                train_prompts: list[dict], step: int, rank: int) -> tuple[dict[str, float], bool]:
    """One GRPO step; returns (monitors, skipped-for-NaN)."""
    prompts = sample_prompts(train_prompts, cfg.prompts_per_step, random.Random(derive_seed(cfg.seed, step, rank, 0)),
                             cfg.balance_tags)
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, step, rank, 1))
    t0 = time.perf_counter()
    with torch.no_grad():
        rollout = scenario.rollout(model, ref_model, prompts, cfg.group_size, generator)
    t1 = time.perf_counter()
    rewards, parts = scenario.score(rollout)
    adv = scenario.advantages(rewards, cfg.group_size)
    t2 = time.perf_counter()
    row = step_metrics(rewards, parts, adv)
    skipped = False
    for u in range(cfg.inner_updates):
        with engine.autocast():
            loss, stats = scenario.loss(model, ref_model, rollout, adv, u)
        finite = _all_min(1.0 if bool(torch.isfinite(loss.detach()).all()) else 0.0)
        if finite == 0.0:
            skipped = True
            model.zero_grad(set_to_none=True)
            break
        engine.backward(loss)
        engine.step()
        for k, v in stats.items():
            if u == 0 or k != "logprob_gap":
                row[f"loss/{k}" if u == 0 else f"loss/{k}_u{u}"] = _stat(v)
        row["loss/total" if u == 0 else f"loss/total_u{u}"] = _stat(loss)
        row["grad_norm" if u == 0 else f"grad_norm_u{u}"] = float(engine.grad_norm or 0.0)
    t3 = time.perf_counter()
    row.update({"time/rollout_s": t1 - t0, "time/score_s": t2 - t1, "time/loss_s": t3 - t2,
                "time/step_s": t3 - t0, "skipped": float(skipped)})
    return row, skipped


def run_rl(scenario: str, params: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None,
           **_: Any) -> dict[str, Any]:
    """CLI / DVC / Dagster entry point: ``load_rl_config`` then :func:`train_rl`."""
    return train_rl(load_rl_config(scenario, params, overrides))
