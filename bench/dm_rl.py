"""DM GRPO on the tiny model, side by side with diffusers, in one run:

1. **Rollout vs diffusers.** Our Flow-GRPO SDE rollout (LM + connector once per prompt, CFG, log-prob per step,
   :func:`unirl.rl.dm_policy.dm_rollout`) against diffusers' own ``SanaPipeline`` sampling the SAME DiT at the same
   steps, batch and CFG scale. The pipeline is built around our ``SanaTransformer2DModel`` with ``vae=None`` and
   ``text_encoder=None``: our conditioning goes in as ``prompt_embeds`` (the zeroed conditioning as
   ``negative_prompt_embeds``: our unconditional branch), ``output_type="latent"`` skips decoding, and since a
   VAE-less pipeline assumes a spatial factor of 32, ``height = width = 32 x latent side`` makes it draw latents of
   our pixel-space size. Its ``FlowMatchEulerDiscreteScheduler`` gets our unshifted grid as ``sigmas`` with our
   shift, i.e. exactly our sigmas. With an untrained (zero-initialised) reference path the pipeline's ODE latents
   equal our ODE sampler's from the same noise; after SFT they differ, because our t2i velocity includes the trained
   reference path applied to a zero reference (a learned bias) that the pipeline's plain DiT call lacks.
2. **Batched replay vs per-step loop.** Forward + backward of the DM GRPO loss over all G*T stored transitions in
   ONE batched DiT pass (conditioning once per prompt) against the reference code's loop: one DiT pass + backward
   per timestep (conditioning recomputed per step), gradients accumulated. Both give the same gradient.
3. **Window vs all steps.** Two short ``train_rl`` runs from the same init: SDE on a 2-step window (ODE elsewhere)
   vs SDE on every step; reward gained on held-out prompts per wall-second of training.

    python bench/dm_rl.py                # init: data/models/sft if present, else a random tiny model
    python bench/dm_rl.py --quick        # smaller sizes (CI smoke)

The last printed line is one JSON object with ``rollout_vs_diffusers`` (time ratio ours / diffusers),
``batched_replay_speedup`` (per-step loop time / batched time) and ``window_vs_all_reward_per_s``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unirl.hostmem import retain_freed_memory  # noqa: E402
from unirl.rl.dm_policy import DMSampling, dm_loss, dm_rollout, replay_step, sample_ode, seeded_noise  # noqa: E402
from unirl.rl.flow_sde import dm_grpo_loss  # noqa: E402


def load_model(init: str | None, workdir: Path):
    from unirl.models import UnifiedModel
    from unirl.models.tiny import tiny_model

    if init and Path(init).is_dir():
        return UnifiedModel.from_pretrained(init), init
    model = tiny_model(workdir / "tiny")
    path = workdir / "init"
    model.save_pretrained(path)
    return model, str(path)


def prompts_from(shards: Path, n: int, split: str = "train") -> list[dict]:
    from unirl.data import tasks
    from unirl.rl.prompts import load_prompts

    if (shards / "t2i").is_dir():
        return load_prompts(shards, "t2i", split, limit=n)
    rng = random.Random(f"bench-{split}")
    return [tasks.generate("t2i", rng, 32).meta for _ in range(n)]


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


# ---------------------------------------------------------------------------------------------- 1. rollout
def sana_pipeline(model):
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    sched = FlowMatchEulerDiscreteScheduler(shift=model.config.sampling.shift)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model.dit, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_sample(pipe, model, cond, steps: int, cfg: float, latents: torch.Tensor) -> torch.Tensor:
    side = model.latent_shape[-1]
    unshifted = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1].tolist()  # our grid before the shift
    # Our T2I DiT calls carry the zero-reference tokens (a learned constant after SFT, see UnifiedModel.reference);
    # the pipeline calls model.dit directly, so add them there too: both then sample the same model.
    with torch.no_grad(), model.reference(torch.zeros((1, *model.latent_shape))):
        return pipe(prompt_embeds=cond.hidden, prompt_attention_mask=cond.mask, negative_prompt=None,
                    negative_prompt_embeds=cond.zeroed().hidden, negative_prompt_attention_mask=cond.mask,
                    guidance_scale=cfg, sigmas=unshifted,
                    num_inference_steps=steps, height=32 * side, width=32 * side, latents=latents.clone(),
                    output_type="latent", use_resolution_binning=False, return_dict=False)[0]


@contextlib.contextmanager
def pipeline_guidance(model):
    """``SanaPipeline`` guides every step with one weight: give the model that guidance (constant, no interval) inside
    the block, so that both sides compute the same thing."""
    saved = model.config.sampling
    model.config.sampling = dataclasses.replace(saved, cfg_max_sigma=1.0, cfg_schedule="constant")
    try:
        yield
    finally:
        model.config.sampling = saved


def bench_rollout(model, prompts: list[dict], G: int, steps: int, cfg: float, repeats: int) -> dict:
    texts = [p["prompt"] for p in prompts]
    sampling = DMSampling(steps=steps, noise_level=0.7, cfg_scale=cfg, window_size=steps)
    pipe = sana_pipeline(model)
    B = len(texts) * G
    latents = torch.randn((B, *model.latent_shape), generator=torch.Generator().manual_seed(0))  # (B, C, H, W)

    def ours():
        return dm_rollout(model, texts, None, "t2i", G, sampling, torch.Generator().manual_seed(1))

    def theirs():
        with torch.no_grad():
            c = model.encode(texts, None, "t2i").repeat_interleave(G)  # conditioning, as ours does
            return diffusers_sample(pipe, model, c, steps, cfg, latents)

    with pipeline_guidance(model):
        with torch.no_grad():
            cond = model.encode(texts, None, "t2i").repeat_interleave(G)  # (B, N, D)
            ours_ode = sample_ode(model, [t for t in texts for _ in range(G)], None, "t2i", list(range(B)), sampling)
            theirs_ode = diffusers_sample(pipe, model, cond, steps, cfg, seeded_noise(model.latent_shape, range(B)))
        same = float((ours_ode - theirs_ode).abs().max())
        t_ours, _ = timed(ours, repeats)
        t_theirs, _ = timed(theirs, repeats)
    return {"ours_s": t_ours, "diffusers_s": t_theirs, "ratio": t_ours / t_theirs, "batch": B, "steps": steps,
            "ode_max_abs_diff_vs_diffusers": same}


# ---------------------------------------------------------------------------------------------- 2. replay
def bench_replay(model, prompts: list[dict], G: int, steps: int, cfg: float, repeats: int) -> dict:
    texts = [p["prompt"] for p in prompts]
    sampling = DMSampling(steps=steps, noise_level=0.7, cfg_scale=cfg, window_size=steps)
    model.set_trainable("t2i")
    rollout = dm_rollout(model, texts, None, "t2i", G, sampling, torch.Generator().manual_seed(2))
    adv = torch.randn(rollout.batch_size, generator=torch.Generator().manual_seed(3))
    params = [p for p in model.parameters() if p.requires_grad]

    def batched():
        model.zero_grad(set_to_none=True)
        loss, _ = dm_loss(model, None, [rollout], [adv], 1e-3, 0.0)
        loss.backward()
        return [p.grad.clone() for p in params]

    # the reference code's loop encodes every sample's prompt (not once per prompt) at every timestep
    per_sample = dataclasses.replace(rollout, texts=[t for t in texts for _ in range(G)], repeat=1)

    def loop(r):
        def run():
            model.zero_grad(set_to_none=True)
            T = r.x.shape[1]
            for w in range(T):  # one DiT pass + backward per timestep, gradients accumulated
                lp = replay_step(model, [r], w).log_prob  # (B, 1)
                loss, _ = dm_grpo_loss(lp, r.log_prob[:, w : w + 1], adv, 1e-3, 0.0)
                (loss / T).backward()
            return [p.grad.clone() for p in params]

        return run

    t_b, g_b = timed(batched, repeats)
    t_l, g_l = timed(loop(per_sample), repeats)
    t_p, _ = timed(loop(rollout), repeats)

    def norm(gs):
        return torch.cat([g.flatten() for g in gs]).norm()

    err = float(norm([a - b for a, b in zip(g_b, g_l)]) / norm(g_l))
    model.zero_grad(set_to_none=True)
    return {"batched_s": t_b, "per_step_s": t_l, "speedup": t_l / t_b, "per_step_prompt_cond_s": t_p,
            "speedup_vs_prompt_cond_loop": t_p / t_b, "transitions": rollout.batch_size * steps,
            "rel_grad_diff": err}


# ---------------------------------------------------------------------------------------------- 3. window
def bench_window(init: str, shards: Path, reward: str, steps: int, rl_steps: int, eval_prompts: int,
                 workdir: Path) -> dict:
    from unirl.models import UnifiedModel
    from unirl.rewards import get
    from unirl.rl.prompts import load_prompts
    from unirl.rl.scenarios.t2i import T2IScenario
    from unirl.rl.trainer import RLConfig, train_rl
    from unirl.train.engine import EngineConfig

    held_out = load_prompts(shards, "t2i", "test", limit=eval_prompts)

    def held_out_reward(path: str, cfg: RLConfig) -> float:
        """Mean ``reward`` of ODE samples (fixed seeds) of the model at ``path`` on the held-out prompts."""
        images = T2IScenario(cfg).generate(UnifiedModel.from_pretrained(path), held_out, cfg.eval_seed)
        vals = get(reward)(images, [p["prompt"] for p in held_out], held_out)
        return sum(vals) / len(vals)

    out, before = {}, None
    for name, window in (("window", 2), ("all", steps)):
        cfg = RLConfig(scenario="t2i", init_dir=init, shards_dir=str(shards), out_dir=str(workdir / name / "model"),
                       reports_dir=str(workdir / name / "reports"), run_dir=str(workdir / name / "run"),
                       steps=rl_steps, prompts_per_step=4, group_size=4, sde_steps=steps, sde_window_size=window,
                       sde_window_range=[0, max(window, steps // 2)] if window < steps else [],
                       eval_prompts=4, eval_steps=steps, rewards={reward: 1.0}, lr_dm=3e-4, beta_dm=0.0,
                       tracking=False, progress=False, engine=EngineConfig(grad_clip=1.0))
        train_rl(cfg)
        train_s = sum(r["time/step_s"] for r in _history(workdir / name / "reports" / "reward_curve.csv"))
        before = held_out_reward(init, cfg) if before is None else before
        after = held_out_reward(cfg.out_dir, cfg)
        gain = after - before
        out[name] = {"window_size": window, "train_s": train_s, "eval_gain": gain, "gain_per_s": gain / train_s,
                     "before": before, "after": after, "metric": f"held-out {reward}"}
    w, a = out["window"]["gain_per_s"], out["all"]["gain_per_s"]
    out["ratio"] = w / a if a > 0 else None
    return out


def _history(csv_path: Path) -> list[dict]:
    import csv

    return [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(csv_path.open())]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--init", default="data/models/sft", help="save_pretrained dir (else a random tiny model)")
    ap.add_argument("--shards", default="data/shards", help="shard root with t2i/ (falls back to generated prompts)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--cfg", type=float, default=3.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rl-steps", type=int, default=10, help="GRPO steps of each window-vs-all run")
    ap.add_argument("--eval-prompts", type=int, default=48)
    ap.add_argument("--reward", default=None, help="default: geneval with an SFT init, else jpeg_compressibility")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.prompts, args.group_size, args.steps, args.repeats, args.rl_steps, args.eval_prompts = 2, 2, 4, 1, 2, 4
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    retained = retain_freed_memory()  # as the `unirl` stages run (UNIRL_RETAIN_FREED_MEMORY=0: glibc's defaults)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model, init = load_model(args.init, work)
        trained = init == args.init
        shards = Path(args.shards)
        if not (shards / "t2i").is_dir():
            from unirl.data import tasks
            from unirl.data.shard_writer import write_shards

            rng = random.Random("bench")
            items = [(f"t2i_{i:05d}", "train" if i < 64 else "test", tasks.generate("t2i", rng, 32))
                     for i in range(64 + args.eval_prompts)]
            write_shards(items, work / "shards", "t2i")
            shards = work / "shards"
        prompts = prompts_from(shards, args.prompts)
        model.eval()
        r1 = bench_rollout(model, prompts, args.group_size, args.steps, args.cfg, args.repeats)
        print(f"[1] rollout B={r1['batch']} T={r1['steps']}: ours (SDE + log-probs + LM) {r1['ours_s']:.3f}s | "
              f"diffusers SanaPipeline {r1['diffusers_s']:.3f}s | ratio {r1['ratio']:.3f} (goal <= 1.15) | "
              f"ODE latents max |ours - diffusers| = {r1['ode_max_abs_diff_vs_diffusers']:.2e}", flush=True)
        r2 = bench_replay(copy.deepcopy(model), prompts, args.group_size, args.steps, args.cfg, args.repeats)
        print(f"[2] replay of {r2['transitions']} transitions (fwd+bwd): batched {r2['batched_s']:.3f}s | per-step "
              f"loop as the reference code {r2['per_step_s']:.3f}s | speedup {r2['speedup']:.2f}x (goal >= 3) | "
              f"per-step loop with conditioning once per prompt {r2['per_step_prompt_cond_s']:.3f}s "
              f"({r2['speedup_vs_prompt_cond_loop']:.2f}x) | |grad diff| / |grad| {r2['rel_grad_diff']:.1e}",
              flush=True)
        reward = args.reward or ("geneval" if trained else "jpeg_compressibility")
        r3 = bench_window(init, shards, reward, args.steps, args.rl_steps, args.eval_prompts, work)
        for k in ("window", "all"):
            v = r3[k]
            print(f"[3] {k:6s} (SDE on {v['window_size']}/{args.steps} steps): train {v['train_s']:.1f}s, "
                  f"{v['metric']} {v['before']:.4f} -> {v['after']:.4f} ({v['eval_gain']:+.4f}), "
                  f"{v['gain_per_s']:+.2e}/s", flush=True)
    summary = {
        "rollout_vs_diffusers": round(r1["ratio"], 4),
        "batched_replay_speedup": round(r2["speedup"], 3),
        "window_vs_all_reward_per_s": None if r3["ratio"] is None else round(r3["ratio"], 3),
        "rollout": r1, "replay": r2, "window": r3, "init": "sft" if trained else "random tiny", "reward": reward,
        "threads": args.threads, "retained_heap": retained,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
