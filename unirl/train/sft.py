"""The SFT stage: LM cold start (text cross-entropy), then DM flow matching with the LM frozen.

Phases, in this order (one global optimiser-step counter runs through both; step ``s`` of the DM phase is global
step ``lm_steps + s``):

1. **LM phase** (the paper's CoT cold start, needed by the tiny profile): :func:`~unirl.train.losses.lm_loss` on
   the responses of ``t2i_cot``, ``understand`` (the image through the vision tower), ``prompt_refine`` and
   ``reflect``; trains the LM and its vision tower (``set_trainable("lm_sft")``). It runs first so that the LM's
   hidden state after the assistant header already encodes what the prompt asks for when the queries read it.
2. **DM phase**: :func:`~unirl.train.losses.flow_matching_loss` (logit-normal sigma, ``eps - x0`` target,
   condition dropout, reference noising - exactly the design) on t2i batches (``t2i`` queries) and edit batches
   (``i2i`` queries, source image through the vision tower and as reference latents); trains DiT + connector +
   both query sets + the reference path (``set_trainable("dm_sft")``); the LM is frozen but gradients flow
   through it into the queries. Queries and connector may get a larger learning rate than the DiT.

Every batch and every noise draw is a function of ``(seed, phase, step, micro-batch, rank)``, so stopping and
resuming from the latest checkpoint in ``run_dir`` reproduces an uninterrupted run exactly on CPU. The same entry
point runs as one process or under ``torchrun``/``deepspeed`` (the engine averages gradients; rank 0 writes).
The saved model holds, with ``ema_decay`` > 0, the exponential moving average of the DM phase's trained weights
(:mod:`unirl.train.ema`; the step checkpoints keep the iterate and the average, so a resume is exact).
Outputs: ``save_pretrained(out_dir)`` (with the tokenizer), held-out metrics JSON (GenEval-style per tag via the
verifier; LM format rate per task), the loss CSV and plot, the final sample grid; MLflow run with losses and
learning rates every step, a sample grid each ``eval_interval`` and every checkpoint logged as a model.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from unirl.atomic import atomic_write_json
from unirl.config import option, to_dict
from unirl.eval.grid import make_grid, save_image_atomic
from unirl.models.config import load_model_config
from unirl.models.tokenizer import load_tokenizer
from unirl.models.unified import DTYPES, UnifiedModel
from unirl.progress import progress_bar
from unirl.tracking import data_version, make_tracker
from unirl.train import sft_data as D
from unirl.train.checkpoint import (
    INDEX,
    CheckpointError,
    inputs_digest,
    latest_checkpoint,
    resume_training,
    save_training_checkpoint,
)
from unirl.train.distributed import barrier, default_device, init_distributed
from unirl.train.ema import WeightEMA
from unirl.train.engine import Engine, EngineConfig, build_engine
from unirl.train.loss_log import LossLog
from unirl.train.losses import flow_matching_loss, lm_loss
from unirl.train.vae import with_trained_vae

__all__ = ["SFTConfig", "param_digest", "resolve_run_dir", "run_sft"]


@dataclass
class SFTConfig:
    """The ``sft`` stage (``params.yaml`` section ``sft``)."""

    # --- inputs / outputs ---
    profile: str = option("tiny", "model profile: configs/<profile>.yaml")
    shards_dir: str = option("data/shards", "curated task shards (output of the curate stage)")
    tokenizer_dir: str = option("data/tokenizer", "trained tokenizer (output of the tokenizer stage)")
    vae_dir: str = option("data/models/vae", "trained autoencoder (output of the vae stage), for a profile whose vae "
                                             "is a config without a path; '' = untrained (tests only)")
    out_dir: str = option("data/models/sft", "final model directory (save_pretrained, tokenizer included)")
    run_dir: str = option("", "step checkpoints; a run resumes from the newest one here. Empty: "
                               "data/runs/sft/<hash of the training settings and the input data>, so a rerun "
                               "with other settings or data (e.g. `dvc repro` after a params.yaml change or a new "
                               "vae) starts afresh and one with the same settings and data resumes")
    resume_from: str | None = option(None, "explicit checkpoint (step dir or run dir) to resume from; must exist")
    metrics_path: str = option("data/metrics/sft.json", "held-out evaluation metrics (JSON)")
    loss_csv: str = option("data/plots/sft_loss.csv", "per-step losses (CSV: step, phase, loss)")
    loss_plot: str = option("data/plots/sft_loss.png", "loss curve (PNG)")
    grid_path: str = option("data/plots/sft_grid.png", "final sample grid of held-out prompts (PNG)")
    seed: int = option(0, "seed of the model init, the data order and every noise draw")
    processes: int = option(1, "local data-parallel processes: >1 relaunches `unirl sft` (so `dvc repro`, the Dagster "
                               "asset) under `torchrun --standalone`; batch sizes are per process; an outside "
                               "torchrun/deepspeed launcher's world size overrides it")
    torch_threads: int = option(1, "torch intra-op threads per process (0 = torch's default; 1 is fastest on a shared "
                                    "2-core machine, 2 when the run is alone)")
    # --- LM phase ---
    lm_steps: int = option(300, "optimiser steps of the LM phase (0 skips it)")
    lm_batch_size: int = option(32, "LM examples per micro-batch (per process)")
    lm_lr: float = option(2e-3, "learning rate of the LM decoder")
    vision_lr: float = option(2e-3, "learning rate of the vision tower")
    lm_task_weights: dict = option({"t2i_cot": 1.0, "understand": 1.0, "prompt_refine": 1.0, "reflect": 1.0},
                                   "LM tasks and their sampling weights")
    # --- DM phase ---
    dm_steps: int = option(3000, "optimiser steps of the DM phase (0 skips it)")
    dm_batch_size: int = option(16, "images per micro-batch (per process)")
    dit_lr: float = option(2e-3, "learning rate of the DiT")
    connector_lr: float = option(3e-3, "learning rate of the connector")
    query_lr: float = option(3e-3, "learning rate of the t2i and i2i queries")
    ref_lr: float = option(1e-3, "learning rate of the reference path (ref patch embed + zero-init projection)")
    edit_fraction: float = option(0.2, "share of DM steps that are edit batches (the rest are t2i)")
    t2i_tag_weights: dict = option({"single_object": 6.0, "two_object": 1.0, "counting": 1.0, "colors": 1.0,
                                    "position": 1.0, "color_attr": 1.0},
                                   "sampling weight of each t2i tag (missing tags weigh 1)")
    drop_text: float = option(0.05, "condition dropout: text only")
    drop_ref: float = option(0.05, "condition dropout: reference only")
    drop_both: float = option(0.05, "condition dropout: both")
    ema_decay: float = option(0.0, "EMA of the DM phase's trained weights (unirl.train.ema); the saved model is the "
                                   "average, the step checkpoints keep both. 0 = save the last iterate")
    # --- engine / schedule ---
    engine: EngineConfig = dataclasses.field(default_factory=lambda: EngineConfig(warmup_steps=50))
    checkpoint_interval: int = option(500, "save a checkpoint every this many global steps (and at phase ends)")
    keep_last: int = option(2, "checkpoints kept in run_dir")
    max_minutes: float = option(12.0, "wall-time guard: the DM phase stops early once training has run this long")
    max_bad_fraction: float = option(0.0, "tolerated share of unreadable samples per shard set")
    # --- evaluation ---
    eval_interval: int = option(500, "log a sample grid of held-out prompts every this many global steps")
    eval_per_tag: int = option(48, "held-out t2i test prompts per tag in the final evaluation")
    eval_lm_per_task: int = option(40, "held-out prompts per LM task in the final format check")
    eval_steps: int = option(20, "Euler steps of evaluation sampling")
    eval_cfg: float | None = option(None, "CFG scale of evaluation sampling; null = the profile's sampling.cfg_scale "
                                          "(with its cfg_schedule either way)")
    eval_seed: int = option(1234, "seed of evaluation sampling (fixed: evaluations are comparable)")
    eval_max_new_tokens: int = option(64, "token limit of the greedy LM completions in the format check")
    # --- tracking ---
    tracking: bool = option(True, "log to MLflow (rank 0)")
    experiment: str = option("sft", "MLflow experiment name")
    progress: bool = option(True, "tqdm progress bars")


# ---------------------------------------------------------------------------------------------------- helpers
# Fields that do not change what is trained (outputs, logging, evaluation, the budget guard): a run may resume
# with other values of these; any other difference makes the checkpoint belong to another run.
_RESUMABLE_CHANGES = {"out_dir", "run_dir", "resume_from", "metrics_path", "loss_csv", "loss_plot", "grid_path",
                      "torch_threads", "checkpoint_interval", "keep_last", "max_minutes", "max_bad_fraction",
                      "tracking", "experiment", "progress"}


def training_signature(cfg: SFTConfig) -> dict[str, Any]:
    """The config fields a checkpoint must agree on to be resumed (stored in each checkpoint's ``extra``), and the
    profile's architecture (``configs/<profile>.yaml`` without ``sampling``, which training never reads: a new
    sampling default re-evaluates the finished run instead of training it again)."""
    sig = {k: v for k, v in to_dict(cfg).items() if k not in _RESUMABLE_CHANGES and not k.startswith("eval_")}
    arch = to_dict(load_model_config(cfg.profile))
    arch.pop("sampling", None)
    return {**sig, "model_architecture": arch}


def resolve_run_dir(cfg: SFTConfig) -> SFTConfig:
    """``cfg`` with an empty ``run_dir`` filled in as ``data/runs/sft/<12 hex digits>`` of the training signature
    and the input data (shards, tokenizer, autoencoder): new data starts afresh instead of resuming stale weights."""
    if cfg.run_dir:
        return cfg
    inputs = inputs_digest([cfg.shards_dir, cfg.tokenizer_dir, cfg.vae_dir])
    blob = json.dumps([training_signature(cfg), inputs], sort_keys=True, default=str).encode()
    return dataclasses.replace(cfg, run_dir=f"data/runs/sft/{hashlib.sha256(blob).hexdigest()[:12]}")


def _resume_point(cfg: SFTConfig) -> tuple[Path | None, str, int, float]:
    """(checkpoint, phase, phase step, seconds the run has spent) to resume from, or (None, 'lm', 0, 0.0)."""
    if cfg.resume_from is not None:
        p = Path(cfg.resume_from)
        ckpt = p if (p / INDEX).exists() else latest_checkpoint(p)
        if ckpt is None:
            raise CheckpointError(f"sft.resume_from={cfg.resume_from} holds no checkpoint (no step-XXXXXX/{INDEX}): "
                                  "point it at a run directory or step directory written by SFT, or unset it")
    else:
        ckpt = latest_checkpoint(cfg.run_dir)
    if ckpt is None:
        return None, "lm", 0, 0.0
    try:
        extra = json.loads((ckpt / INDEX).read_text())["extra"] or {}
        phase, phase_step, saved = str(extra["phase"]), int(extra["phase_step"]), dict(extra["config"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / INDEX} is unreadable or was not written by SFT ({e!r}): delete {ckpt} "
                              "to resume from the previous checkpoint, or empty sft.run_dir to start over") from e
    now = json.loads(json.dumps(training_signature(cfg)))  # JSON round trip: tuples -> lists, as stored
    changed = sorted(k for k in set(now) | set(saved) if now.get(k) != saved.get(k))
    if changed:
        raise CheckpointError(f"{ckpt} belongs to an SFT run with other settings ({', '.join(changed)} differ): "
                              f"delete {ckpt.parent} to start a new run, or restore those values to resume it")
    return ckpt, phase, phase_step, float(extra.get("elapsed_s", 0.0))


def _any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any (keeps the ranks' loops in step)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)
    return flag


def _phase_engine(model: UnifiedModel, cfg: SFTConfig, phase: str) -> Engine:
    ecfg = copy.deepcopy(cfg.engine)
    ecfg.total_steps = cfg.lm_steps if phase == "lm" else cfg.dm_steps
    ecfg.warmup_steps = min(ecfg.warmup_steps, max(ecfg.total_steps - 1, 0))
    g = model.parameter_groups()
    if phase == "lm":
        model.set_trainable("lm_sft")
        groups = [("lm", cfg.lm_lr, ["lm"]), ("vision", cfg.vision_lr, ["vision"])]
    else:
        model.set_trainable("dm_sft")
        groups = [("dit", cfg.dit_lr, ["dit"]), ("connector", cfg.connector_lr, ["connector"]),
                  ("queries", cfg.query_lr, ["t2i_queries", "i2i_queries"]), ("ref", cfg.ref_lr, ["ref"])]
    param_groups = [{"name": n, "lr": lr, "params": [p for k in keys for _, p in g[k]]} for n, lr, keys in groups]
    return build_engine(model, param_groups, ecfg)


# ---------------------------------------------------------------------------------------------------- steps
def _lm_step(engine: Engine, cfg: SFTConfig, data: dict, step: int, rank: int) -> float:
    model: UnifiedModel = engine.module
    total = 0.0
    for micro in range(cfg.engine.grad_accum_steps):
        batch = D.sample_lm_batch(data, cfg.lm_task_weights, cfg.lm_batch_size, D.step_rng(cfg.seed, "lm", step,
                                                                                            micro, rank))
        images = [e.image for e in batch] if any(e.image is not None for e in batch) else None
        with engine.autocast():
            loss = lm_loss(model, [e.prompt for e in batch], [e.response for e in batch], images)
        engine.backward(loss)
        total += float(loss.detach()) / cfg.engine.grad_accum_steps
        engine.step()
    return total


def _dm_step(engine: Engine, cfg: SFTConfig, data: D.DMData, tag_index: dict, step: int,
             rank: int) -> tuple[float, str]:
    model: UnifiedModel = engine.module
    dev = model.device
    total, kind = 0.0, "t2i"
    for micro in range(cfg.engine.grad_accum_steps):
        rng = D.step_rng(cfg.seed, "dm", step, micro, rank)
        gen = D.step_generator(cfg.seed, "dm", step, micro, rank)
        edit = len(data.edit_prompts) > 0 and rng.random() < cfg.edit_fraction
        drops = dict(drop_text=cfg.drop_text, drop_ref=cfg.drop_ref, drop_both=cfg.drop_both)
        with engine.autocast():
            if edit:
                kind = "edit"
                idx = rng.integers(len(data.edit_prompts), size=cfg.dm_batch_size)
                cond = model.encode([data.edit_prompts[i] for i in idx], [data.edit_images[i] for i in idx], "i2i")
                loss = flow_matching_loss(model, data.edit_tgt[idx].to(dev), cond, data.edit_src[idx].to(dev),
                                          generator=gen, **drops)
            else:
                idx = D.sample_t2i_indices(data, tag_index, cfg.t2i_tag_weights, cfg.dm_batch_size, rng)
                cond = model.encode([data.t2i_prompts[i] for i in idx], None, "t2i")
                loss = flow_matching_loss(model, data.t2i_latents[idx].to(dev), cond, None, generator=gen, **drops)
        engine.backward(loss)
        total += float(loss.detach()) / cfg.engine.grad_accum_steps
        engine.step()
    return total, kind


# ---------------------------------------------------------------------------------------------------- the stage
def run_sft(cfg: SFTConfig) -> dict[str, Any]:
    """Train (LM phase, then DM phase), save ``out_dir``, evaluate on held-out prompts; return a summary."""
    t_start = time.time()
    cfg = resolve_run_dir(cfg)
    if cfg.torch_threads > 0:
        torch.set_num_threads(cfg.torch_threads)
    info = init_distributed()
    rank, main = info.rank, info.is_main
    for name, least in (("lm_steps", 0), ("dm_steps", 0), ("processes", 1)):
        if getattr(cfg, name) < least:
            raise ValueError(f"sft.{name} must be >= {least}, got {getattr(cfg, name)}")
    # `spent`: the time earlier invocations of this run trained; the wall-time guard counts it, so a run the guard
    # stopped, rerun with the same settings (`dvc repro` after a code change), evaluates again instead of training on
    ckpt, phase0, phase_step0, spent = _resume_point(cfg)

    def trained_minutes() -> float:
        return (spent + time.time() - t_start) / 60

    tok = load_tokenizer(cfg.tokenizer_dir)
    mcfg = with_trained_vae(load_model_config(cfg.profile), cfg.vae_dir)
    torch.manual_seed(cfg.seed)
    model = UnifiedModel.build(mcfg, tok).to(default_device(info))
    model.train()
    res = mcfg.resolution
    lm_train = D.load_lm_data(cfg.shards_dir, [t for t, w in cfg.lm_task_weights.items() if w > 0], "train",
                              cfg.max_bad_fraction, res) if cfg.lm_steps else {}
    dm_train = D.load_dm_data(model, cfg.shards_dir, cfg.max_bad_fraction, res, with_edit=cfg.edit_fraction > 0)
    heldout = D.heldout_t2i(cfg.shards_dir, cfg.eval_per_tag, cfg.max_bad_fraction, res)
    grid_items = [heldout[i] for i in range(0, len(heldout), max(1, len(heldout) // 16))][:16]

    params = to_dict(cfg)
    dversion = data_version("dvc.lock", cfg.shards_dir)
    tracker = make_tracker(cfg.experiment, enabled=cfg.tracking, is_main=main)
    tracker.start("sft", params=params, tags={"seed": str(cfg.seed), "data_version": str(dversion),
                                              "resumed_from": str(ckpt) if ckpt else ""})
    losses = LossLog(Path(cfg.run_dir) / "loss.csv", 0, main)
    total_steps = cfg.lm_steps + cfg.dm_steps
    bar = progress_bar(total=total_steps, desc="sft", unit="step", disable=not (cfg.progress and main))
    status = "FAILED"
    try:
        stopped_early = False
        engine: Engine | None = None
        ema: WeightEMA | None = None
        for phase in ("lm", "dm"):
            n_steps = cfg.lm_steps if phase == "lm" else cfg.dm_steps
            offset = 0 if phase == "lm" else cfg.lm_steps
            if n_steps == 0 or (phase == "lm" and phase0 == "dm"):
                continue
            engine = _phase_engine(model, cfg, phase)
            ema = WeightEMA(engine.trainable, cfg.ema_decay) if phase == "dm" and cfg.ema_decay > 0 else None
            start = 0
            if ckpt is not None and phase == phase0:
                loaded = resume_training(engine, ckpt)
                if ema is not None:
                    ema.load_state_dict(loaded.stage_state.get("ema"), loaded.path)
                start = phase_step0
                losses = LossLog(Path(cfg.run_dir) / "loss.csv", offset + start, main)
            bar.n = offset + start
            bar.refresh()
            tag_index = dm_train.tag_index()
            if phase == "dm" and start > 0 and spent / 60 > cfg.max_minutes:  # the guard stopped this run already
                stopped_early = start < n_steps
                break
            for s in range(start, n_steps):
                gstep = offset + s + 1
                if phase == "lm":
                    loss, kind = _lm_step(engine, cfg, lm_train, s, rank), "lm"
                else:
                    loss, kind = _dm_step(engine, cfg, dm_train, tag_index, s, rank)
                    if ema is not None:
                        ema.update()
                losses.add(gstep, phase, loss)
                lrs = {f"lr/{k}": v for k, v in engine.lr().items()}
                tracker.log_metrics({f"loss/{phase}": loss, f"loss/{phase}_{kind}": loss,
                                     "grad_norm": engine.grad_norm or 0.0, **lrs}, step=gstep)
                bar.update(1)
                bar.set_postfix(phase=phase, loss=f"{loss:.4f}")
                out_of_time = phase == "dm" and _any_rank(trained_minutes() > cfg.max_minutes)
                last = s + 1 == n_steps or out_of_time
                if gstep % cfg.checkpoint_interval == 0 or last:
                    losses.write()  # before the checkpoint: a resume keeps the rows up to its step
                    path = save_training_checkpoint(engine, cfg.run_dir, gstep, keep_last=cfg.keep_last,
                                                    extra={"phase": phase, "phase_step": s + 1,
                                                           "config": training_signature(cfg),
                                                           "elapsed_s": trained_minutes() * 60},
                                                    stage_state={"ema": ema.state_dict()} if ema is not None else None)
                    tracker.log_checkpoint(path, gstep, seed=cfg.seed, data_version=dversion, params=params)
                if phase == "dm" and main and (gstep % cfg.eval_interval == 0 or last):
                    _log_grid(model, grid_items, cfg, tracker, gstep)
                if out_of_time:
                    stopped_early = s + 1 < n_steps
                    break
            if stopped_early:
                break
        bar.close()
        train_minutes = trained_minutes()  # every invocation of this run
        _detach_from_engine(model, engine, ema)
        summary = _finish(model, cfg, tracker, losses, heldout, grid_items, main, train_minutes, stopped_early)
        status = "FINISHED"
        return summary
    finally:
        bar.close()
        tracker.finish(status)


def _log_grid(model: UnifiedModel, items: list[dict], cfg: SFTConfig, tracker: Any, step: int) -> Any:
    was = model.training
    model.eval()
    ims = D.generate_heldout(model, items, cfg.eval_steps, cfg.eval_cfg, cfg.eval_seed)
    model.train(was)
    grid = make_grid(ims, [r["prompt"] for r in items], cols=8)
    tracker.log_image(grid, "samples", step)
    return grid


def _detach_from_engine(model: UnifiedModel, engine: Engine | None, ema: WeightEMA | None = None) -> None:
    """Give every parameter its own storage in the profile dtype, holding the engine's (fp32 master) values,
    or with ``ema`` the weight average in place of the trained parameters.

    DeepSpeed ZeRO keeps parameters as views of flat buffers (which safetensors refuses to save) and, with bf16,
    the module in bf16; this is a collective (``model_state_dict`` gathers), so every rank calls it.
    """
    state = engine.model_state_dict() if engine is not None else None
    dtype = DTYPES[model.config.dtype]
    for p in model.parameters():
        p.data = p.data.detach().clone().to(dtype)
    if state is not None:
        model.load_state_dict(ema.averaged(state) if ema is not None else state)


def _finish(model: UnifiedModel, cfg: SFTConfig, tracker: Any, losses: LossLog, heldout: list[dict],
            grid_items: list[dict], main: bool, train_minutes: float, stopped_early: bool) -> dict[str, Any]:
    """Rank 0: save the model, evaluate, write metrics/plots; all ranks: wait for it and return the summary."""
    summary: dict[str, Any] = {"out_dir": cfg.out_dir, "metrics_path": cfg.metrics_path,
                               "param_digest": param_digest(model)}
    if main:
        model.eval()
        model.set_trainable("none")
        model.save_pretrained(cfg.out_dir)
        t0 = time.time()
        geneval, images = D.evaluate_t2i(model, heldout, cfg.eval_steps, cfg.eval_cfg, cfg.eval_seed)
        lm_heldout = D.load_lm_data(cfg.shards_dir, list(cfg.lm_task_weights), "test", cfg.max_bad_fraction,
                                    model.config.resolution)
        fmt = D.evaluate_lm_format(model, lm_heldout, cfg.eval_lm_per_task, cfg.eval_max_new_tokens)
        seen = D.image_information(model, lm_heldout, cfg.eval_lm_per_task)
        metrics = {"geneval": geneval, "lm_format": fmt, "lm_image_nats": seen, "train_minutes": train_minutes,
                   "eval_minutes": (time.time() - t0) / 60, "stopped_early": stopped_early,
                   "run_url": tracker.run_url(),
                   "final_loss": {p: next((v for s, q, v in reversed(losses.rows) if q == p), None)
                                  for p in ("lm", "dm")}}
        atomic_write_json(cfg.metrics_path, metrics)
        losses.write(Path(cfg.loss_csv))
        plot = losses.plot(Path(cfg.loss_plot))
        pick = {id(r): im for r, im in zip(heldout, images)}
        grid = make_grid([pick[id(r)] for r in grid_items], [r["prompt"] for r in grid_items], cols=8)
        save_image_atomic(grid, cfg.grid_path)
        flat = {f"eval/{t}/correct": v["correct"] for t, v in geneval["per_tag"].items()}
        flat |= {f"eval/{t}/score": v["score"] for t, v in geneval["per_tag"].items()}
        flat |= {f"eval/format/{t}": v["format_rate"] for t, v in fmt.items()}
        flat |= {f"eval/image_nats/{t}": v for t, v in seen.items()}
        flat |= {f"eval/overall_{k}": v for k, v in geneval["overall"].items()}
        total = cfg.lm_steps + cfg.dm_steps
        tracker.log_metrics(flat, step=total)
        tracker.log_dict(metrics, "sft_metrics.json")
        for p in (plot, Path(cfg.grid_path), Path(cfg.loss_csv)):
            if p is not None:
                tracker.log_artifact(p, "plots")
        summary |= {"metrics": metrics, "loss_csv": cfg.loss_csv, "loss_plot": cfg.loss_plot,
                    "grid_path": cfg.grid_path, "run_url": tracker.run_url()}
        print(_report(metrics), flush=True)
    barrier()
    return summary


def param_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter's name and bytes (equal on all ranks of a correct data-parallel run)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()


def _report(metrics: dict[str, Any]) -> str:
    g = metrics["geneval"]
    lines = ["SFT held-out evaluation (verifier, GenEval-style):"]
    lines += [f"  {t:14s} correct {v['correct']:.3f}  score {v['score']:.3f}  (n={v['n']})"
              for t, v in g["per_tag"].items()]
    lines.append(f"  {'overall':14s} correct {g['overall']['correct']:.3f}  score {g['overall']['score']:.3f}")
    lines += [f"  format {t:14s} {v['format_rate']:.3f}  exact answer {v['answer_exact']:.3f}"
              for t, v in metrics["lm_format"].items()]
    lines += [f"  image information {t:14s} {v:.3f} nats per response (0: the LM ignores the image)"
              for t, v in metrics.get("lm_image_nats", {}).items()]
    lines.append(f"  train minutes {metrics['train_minutes']:.2f}  eval minutes {metrics['eval_minutes']:.2f}")
    return "\n".join(lines)
