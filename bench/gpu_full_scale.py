"""One ``t2i`` GRPO step at full scale on a GPU, side by side with diffusers' ``SanaPipeline`` at the same size.

Full architecture with random weights (nothing is downloaded): Qwen2.5-VL-3B + SANA-1.6B + DC-AE f32c32 +
connector + 256 queries (``configs/full.yaml``, built directly on the GPU), bf16, 512 px (16 x 16 latents),
G = 8 samples per prompt, 10 SDE steps. It runs:

1. diffusers' ``SanaPipeline`` around our DiT and DC-AE (our conditioning as ``prompt_embeds``, the zeroed one as
   ``negative_prompt_embeds``, our sigmas) generating the same batch at the same size, steps and CFG -> images/s;
2. one GRPO step of the ``t2i`` scenario: rollout (LM + connector once per prompt, SDE with log-probs, DC-AE
   decode) -> reward (the verifier) -> advantages -> loss (all G*T transitions replayed in one batched DiT pass,
   gradient checkpointing on the DiT blocks) + backward + AdamW step -> images/s of the rollout, the step time
   split into rollout / reward / loss, and peak GPU memory.

    python bench/gpu_full_scale.py            # on a CUDA machine
    python bench/gpu_full_scale.py --resolution 1024 --replay-chunk 32   # the paper's size: chunked replay
    python bench/gpu_full_scale.py --smoke    # CPU, tiny profile, small batch: checks the script end to end
    python bench/gpu_full_scale.py --device cpu --layers 1 --resolution 64 --prompts 1 --group-size 2 --steps 2
                                              # CPU dry run of the full widths in bf16, one block per stack

The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unirl.data import tasks  # noqa: E402
from unirl.models import UnifiedModel, load_model_config  # noqa: E402
from unirl.models.tiny import tiny_tokenizer  # noqa: E402
from unirl.rl.scenarios.t2i import T2IScenario  # noqa: E402
from unirl.rl.trainer import RLConfig  # noqa: E402
from unirl.train.engine import EngineConfig, build_engine  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(profile: str, resolution: int, device: torch.device, workdir: Path, layers: int | None = None
          ) -> UnifiedModel:
    cfg = load_model_config(profile)
    cfg.lm.path = cfg.dit.path = cfg.vae.path = None  # random weights from the published architectures
    cfg.resolution = resolution
    if layers is not None:  # same widths, fewer blocks: a dry run of the full path that fits a CPU
        cfg.lm.config["text_config"]["num_hidden_layers"] = layers
        cfg.lm.config["vision_config"]["depth"] = layers
        cfg.dit.config["num_layers"] = layers
        cfg.connector.n_layers = layers
    tok = tiny_tokenizer(workdir / "tokenizer")  # ids only: the weights are random anyway
    torch.manual_seed(0)
    with torch.device(device):
        model = UnifiedModel.build(cfg, tok, load_weights=False)
    return model.to(device)


def diffusers_images_per_s(model: UnifiedModel, texts: list[str], G: int, steps: int, cfg_scale: float,
                           device: torch.device) -> tuple[float, float]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline

    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=model.vae, transformer=model.dit,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=model.config.sampling.shift))
    pipe.set_progress_bar_config(disable=True)
    unshifted = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)[:-1].tolist()
    res = model.config.resolution
    factor = 1 if model.vae is not None else 32  # a VAE-less pipeline assumes a spatial factor of 32

    def run() -> float:
        sync(device)
        t = time.perf_counter()
        with torch.no_grad():
            cond = model.encode(texts, None, "t2i").repeat_interleave(G)  # as our rollout: once per prompt
            pipe(prompt_embeds=cond.hidden, prompt_attention_mask=cond.mask, negative_prompt=None,
                 negative_prompt_embeds=cond.zeroed().hidden, negative_prompt_attention_mask=cond.mask,
                 guidance_scale=cfg_scale, sigmas=unshifted, num_inference_steps=steps, height=res * factor,
                 width=res * factor, output_type="pil" if model.vae is not None else "latent",
                 use_resolution_binning=False, generator=torch.Generator(device).manual_seed(0))
        sync(device)
        return time.perf_counter() - t

    run()  # warm-up
    dt = run()
    return len(texts) * G / dt, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny profile, small sizes")
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--beta-dm", type=float, default=RLConfig.beta_dm,
                    help="KL weight; > 0 keeps a frozen reference copy on the device, as training does")
    ap.add_argument("--grpo-steps", type=int, default=2, help="GRPO steps; the last one is timed")
    ap.add_argument("--replay-chunk", type=int, default=0,
                    help="transitions per checkpointed DiT pass in the loss (0 = all G*T at once; 1024 px needs ~32)")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run of the full profile")
    ap.add_argument("--layers", type=int, default=None,
                    help="blocks per stack (LM, vision tower, DiT, connector) instead of the published depths")
    args = ap.parse_args()
    if args.smoke:
        profile, device = "tiny", torch.device("cpu")
        args.prompts, args.group_size, args.steps, args.resolution = 1, 2, 3, 32
        torch.set_num_threads(2)
    else:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke, or --device cpu --layers 1, on CPU")
        profile, device = "full", torch.device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model = build(profile, args.resolution, device, Path(tmp), None if args.smoke else args.layers)
        build_s = time.perf_counter() - t0
        rng = random.Random(0)
        prompts = [tasks.generate("t2i", rng, 32).meta for _ in range(args.prompts)]
        texts = [p["prompt"] for p in prompts]
        cfg = RLConfig(scenario="t2i", group_size=args.group_size, sde_steps=args.steps, sde_window_size=0,
                       noise_level=0.7, lr_dm=1e-5, beta_dm=args.beta_dm, rewards={"geneval": 1.0}, tracking=False,
                       replay_chunk=args.replay_chunk, engine=EngineConfig(grad_clip=1.0))
        scenario = T2IScenario(cfg)
        cfg_scale = model.config.sampling.cfg_scale
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        theirs_ips, theirs_s = diffusers_images_per_s(model, texts, args.group_size, args.steps, cfg_scale, device)
        diffusers_peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        # the frozen reference copy, as the trainer keeps it (only read when the KL weight is > 0)
        ref = copy.deepcopy(model).requires_grad_(False).eval() if args.beta_dm > 0 else model
        model.dit.enable_gradient_checkpointing()
        engine = build_engine(model, scenario.param_groups(model), cfg.engine)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        steps, random_adv = [], False
        for i in range(args.grpo_steps):  # the first step warms up (kernels, allocator); the last one is reported
            sync(device)
            t = time.perf_counter()
            with torch.no_grad():
                rollout = scenario.rollout(model, ref, prompts, args.group_size, torch.Generator().manual_seed(i))
            sync(device)
            t_roll = time.perf_counter() - t
            t = time.perf_counter()
            rewards, _ = scenario.score(rollout)
            adv = scenario.advantages(rewards, args.group_size)
            t_score = time.perf_counter() - t
            if not bool(adv.any()):  # random weights: every image scores the same, so the advantages are all 0;
                random_adv = True  # seeded N(0, 1) advantages instead, so that the backward carries a real gradient
                adv = scenario.advantages(torch.randn(len(adv), generator=torch.Generator().manual_seed(i)),
                                          args.group_size)
            t = time.perf_counter()
            loss, stats = scenario.loss(model, ref, rollout, adv.to(device), 0)
            engine.backward(loss)
            engine.step()
            sync(device)
            t_loss = time.perf_counter() - t
            steps.append({"rollout": round(t_roll, 3), "reward": round(t_score, 3), "loss": round(t_loss, 3),
                          "ratio_max_dev": stats["ratio_max_dev"], "logprob_gap": stats.get("logprob_gap"),
                          "kl": stats.get("kl"), "grad_norm": engine.grad_norm, "loss_value": float(loss.detach())})
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    B = args.prompts * args.group_size
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu{' (smoke)' * args.smoke}",
        "profile": profile, "layers": args.layers, "dtype": str(model.dtype), "resolution": args.resolution,
        "batch": B, "group_size": args.group_size,
        "sde_steps": args.steps, "build_s": round(build_s, 2),
        "diffusers_images_per_s": round(theirs_ips, 3), "diffusers_s": round(theirs_s, 3),
        "ours_rollout_images_per_s": round(B / t_roll, 3), "rollout_vs_diffusers": round(t_roll / theirs_s, 3),
        "step_s": {k: steps[-1][k] for k in ("rollout", "reward", "loss")}, "steps": steps,
        "beta_dm": args.beta_dm, "replay_chunk": args.replay_chunk,
        "advantages": "random (tied rewards)" if random_adv else "from rewards",
        "first_update_ratio_max_dev": steps[-1]["ratio_max_dev"], "logprob_gap": steps[-1]["logprob_gap"],
        "grad_norm": steps[-1]["grad_norm"], "peak_gpu_gib": None if peak is None else round(peak, 2),
        "diffusers_peak_gpu_gib": None if diffusers_peak is None else round(diffusers_peak, 2),
    }
    print(f"diffusers SanaPipeline: {out['diffusers_images_per_s']} images/s | ours (SDE rollout + log-probs): "
          f"{out['ours_rollout_images_per_s']} images/s | GRPO step: rollout {t_roll:.2f}s, reward {t_score:.2f}s, "
          f"loss+backward+step {t_loss:.2f}s | peak GPU {out['peak_gpu_gib']} GiB", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
