"""RL test helpers and worker: a very small unified model, small t2i/edit shard sets, and a ``train_rl`` runner.

As a script (plain subprocess or under torchrun) it runs :func:`unirl.rl.trainer.train_rl` on a prepared
directory and writes ``<out>/rank{R}.json`` with a digest of the final parameters on every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from _worker_common import param_digest

from unirl.data import tasks
from unirl.data.shard_writer import write_shards
from unirl.models import UnifiedModel, load_model_config
from unirl.models.config import ModelConfig
from unirl.models.tiny import tiny_tokenizer
from unirl.rewards import register, unregister
from unirl.rl.dm_policy import DMRollout, DMSampling, dm_rollout
from unirl.rl.flow_sde import sde_mean_std
from unirl.rl.trainer import RLConfig, train_rl
from unirl.train.engine import EngineConfig

# a random model scores 0 on the verifier; JPEG size / PSNR vary per sample, so the advantages are non-zero
REWARDS = {
    "t2i": {"geneval": 1.0, "jpeg_compressibility": 1.0},
    "edit": {"edit_correctness": 1.0, "cycle_consistency": 0.5, "jpeg_compressibility": 1.0},
}


def small_config() -> ModelConfig:
    """The tiny profile with every width and depth cut down (same classes, 32 px), for fast tests."""
    cfg = load_model_config("tiny")
    text = cfg.lm.config["text_config"]
    text.update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1)
    vision = cfg.lm.config["vision_config"]
    vision.update(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[0])
    cfg.dit.config.update(num_attention_heads=2, attention_head_dim=16, num_layers=2, num_cross_attention_heads=2,
                          cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=32)
    cfg.connector.n_layers, cfg.connector.n_heads = 1, 2
    cfg.n_query = 4
    return cfg


def small_model(tok_dir: Path, seed: int = 0) -> UnifiedModel:
    tok = tiny_tokenizer(tok_dir)
    torch.manual_seed(seed)
    return UnifiedModel.build(small_config(), tok)


def write_data(root: Path, n_train: int = 12, n_test: int = 6) -> Path:
    """t2i and edit shards (train/test) under ``root/shards``; returns that directory."""
    for task in ("t2i", "edit"):
        rng = random.Random(f"rl-test-{task}")
        items = []
        for i in range(n_train + n_test):
            split = "train" if i < n_train else "test"
            items.append((f"{task}_{split}_{i:04d}", split, tasks.generate(task, rng, 32)))
        write_shards(items, root / "shards", task)
    return root / "shards"


def prepare(root: Path) -> tuple[Path, Path]:
    """Shards + a saved small model (``root/sft``); returns (shards_dir, init_dir)."""
    shards = write_data(root)
    init = root / "sft"
    small_model(root / "tok").save_pretrained(init)
    return shards, init


def rl_config(root: Path, scenario: str, tag: str, **kw) -> RLConfig:
    base = dict(
        scenario=scenario, init_dir=str(root / "sft"), shards_dir=str(root / "shards"),
        out_dir=str(root / tag / "model"), reports_dir=str(root / tag / "reports"), run_dir=str(root / tag / "run"),
        steps=2, prompts_per_step=2, group_size=2, sde_steps=3, sde_window_size=2, noise_level=0.7,
        eval_prompts=2, eval_batch_size=4, grid_prompts=2, tracking=False, progress=False, rewards=REWARDS[scenario],
        lr_dm=1e-3, beta_dm=0.01, engine=EngineConfig(grad_clip=1.0),
        # one thread in and out of the test process, so that runs compared bit for bit (resume, DeepSpeed) do
        # the same arithmetic: GEMM results may depend on the thread count for some shapes
        torch_threads=1,
    )
    base.update(kw)
    return RLConfig(**base)


@contextlib.contextmanager
def registered_reward(name: str, fn: Callable) -> Iterator[str]:
    """``fn`` registered as reward ``name`` for the duration of the block."""
    register(name)(fn)
    try:
        yield name
    finally:
        unregister(name)


def train_both_signs(stem: str, score: Callable[[Any], float],
                     make_config: Callable[[str], RLConfig]) -> dict[int, Path]:
    """Two ``train_rl`` runs, with reward ``+score(sample)`` and ``-score(sample)`` (registered as ``<stem>_up`` /
    ``<stem>_down``; ``make_config(reward_name)`` gives each run's config); returns sign -> saved model dir."""
    out = {}
    for sign in (1, -1):
        name = f"{stem}_{'up' if sign > 0 else 'down'}"
        with registered_reward(name, lambda samples, prompts, metadata, s=sign: [s * score(x) for x in samples]):
            cfg = make_config(name)
            train_rl(cfg)
        out[sign] = Path(cfg.out_dir)
    return out


def grad_components(model: UnifiedModel) -> dict[str, set[str]]:
    """Components whose parameters got a non-zero gradient (``nonzero``) / any gradient (``any``)."""
    nonzero, any_grad = set(), set()
    for comp, named in model.parameter_groups().items():
        for _, p in named:
            if p.grad is not None:
                any_grad.add(comp)
                if bool(p.grad.abs().sum() > 0):
                    nonzero.add(comp)
    return {"nonzero": nonzero, "any": any_grad}


def check_rollout_log_probs_against_gaussian(model: UnifiedModel, texts: list[str], k: int) -> DMRollout:
    """A 4-step SDE rollout of ``texts`` (G 2, noise 0.8, CFG 2): at step ``k`` the std matches the closed form
    ``s_k sqrt(-Delta_k)`` with ``s_k = a sqrt(sigma / (1 - sigma))``, and the stored log-probs match
    ``torch.distributions.Normal`` at the recomputed mean. Returns the rollout."""
    sampling = DMSampling(steps=4, noise_level=0.8, cfg_scale=2.0, window_size=4)
    with torch.no_grad():
        dm = dm_rollout(model, texts, None, "t2i", 2, sampling, torch.Generator().manual_seed(0))
        cond = model.encode(texts, None, "t2i").repeat_interleave(2)
        v = model.guided_velocity(dm.x[:, k], dm.sigma[k], cond, None, 2.0)
        mean, std = sde_mean_std(dm.x[:, k], v, dm.sigma[k], dm.sigma_next[k], 0.8)
    s, sn = float(dm.sigma[k]), float(dm.sigma_next[k])
    closed_form = 0.8 * math.sqrt(s / (1 - s)) * math.sqrt(s - sn)
    assert abs(float(std[0]) - closed_form) <= 1e-5 * closed_form, (float(std[0]), closed_form)
    independent = torch.distributions.Normal(mean.double(), std.double()).log_prob(dm.x_next[:, k].double())
    torch.testing.assert_close(dm.log_prob[:, k].double(), independent.mean(dim=(1, 2, 3)), rtol=0, atol=1e-5)
    return dm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--scenario", default="t2i")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--checkpoint-every", type=int, default=0)
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--ema-decay", type=float, default=0.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    root = Path(args.root)
    cfg = rl_config(root, args.scenario, args.tag, steps=args.steps, checkpoint_every=args.checkpoint_every,
                    engine=EngineConfig(backend=args.backend, grad_clip=1.0), ema_decay=args.ema_decay)
    summary = train_rl(cfg)
    from unirl.train.distributed import dist_info, shutdown_distributed

    info = dist_info()
    out = root / args.tag
    out.mkdir(parents=True, exist_ok=True)
    record = {"rank": info.rank, "world_size": info.world_size, "steps": summary["steps"],
              "trainable_sha256": summary["trainable_sha256"]}
    if info.rank == 0:
        record["saved_digest"] = param_digest(UnifiedModel.from_pretrained(cfg.out_dir).state_dict())
    shutdown_distributed()
    (out / f"rank{info.rank}.json").write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
