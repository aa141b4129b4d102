"""SFT stage: outputs of a short real run, per-phase gradients, kill/resume exactness, errors, two processes."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import ROOT, small_params
from unirl.config import load_config, to_dict
from unirl.data.curate import CurateConfig, curate
from unirl.data.t2i_prompts import FAMILIES
from unirl.models import UnifiedModel, load_model_config, load_tokenizer
from unirl.models.tokenizer import TokenizerConfig, build_tokenizer
from unirl.train import CheckpointError, EngineConfig
from unirl.train import sft_data as D
from unirl.train.checkpoint import load_checkpoint
from unirl.train.losses import flow_matching_loss, lm_loss
from unirl.train.sft import SFTConfig, _phase_engine, resolve_run_dir, run_sft
from unirl.train.vae import VAEStageConfig, train_vae

WORKER = ROOT / "tests" / "_sft_worker.py"


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny curated shards + a tokenizer trained on their corpus + a briefly trained autoencoder."""
    tmp = tmp_path_factory.mktemp("sft")
    cur = load_config(CurateConfig, "curate", small_params(tmp, per_tag=10))
    curate(cur, progress=False)
    build_tokenizer(TokenizerConfig(corpus=cur.corpus_path, out_dir=str(tmp / "tokenizer"), vocab_size=512))
    train_vae(VAEStageConfig(shards_dir=cur.out_dir, out_dir=str(tmp / "vae"), metrics_path=str(tmp / "vae.json"),
                             grid_path=str(tmp / "vae.png"), steps=5, decoder_steps=2, batch_size=8, eval_images=8,
                             min_verifier_agreement=0.0, tracking=False, progress=False, torch_threads=1))
    return tmp


def small_cfg(project: Path, out: Path, **kw) -> SFTConfig:
    base = dict(shards_dir=str(project / "data" / "shards"), tokenizer_dir=str(project / "tokenizer"),
                vae_dir=str(project / "vae"),
                out_dir=str(out / "model"), run_dir=str(out / "run"), metrics_path=str(out / "metrics.json"),
                loss_csv=str(out / "loss.csv"), loss_plot=str(out / "loss.png"), grid_path=str(out / "grid.png"),
                lm_steps=2, dm_steps=3, lm_batch_size=4, dm_batch_size=4, edit_fraction=0.5, checkpoint_interval=2,
                eval_interval=2, eval_per_tag=1, eval_lm_per_task=2, eval_steps=2, eval_max_new_tokens=6,
                tracking=False, progress=False, torch_threads=1)
    base.update(kw)
    return SFTConfig(**base)


def test_run_sft_writes_every_output_and_tracks(project: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    cfg = small_cfg(project, tmp_path, tracking=True, experiment="sft-test")
    summary = run_sft(cfg)
    # the final model round-trips and is the trained one
    model = UnifiedModel.from_pretrained(cfg.out_dir)
    assert model.tokenizer is not None and len(model.tokenizer) == len(load_tokenizer(cfg.tokenizer_dir))
    metrics = json.loads(Path(cfg.metrics_path).read_text())
    assert metrics["geneval"]["per_tag"] and set(metrics["geneval"]["per_tag"]) <= set(FAMILIES)
    for v in metrics["geneval"]["per_tag"].values():
        assert 0.0 <= v["correct"] <= v["score"] <= 1.0 and v["n"] == 1
    assert set(metrics["lm_format"]) == set(D.LM_TASKS)
    assert set(metrics["lm_image_nats"]) == {"understand", "reflect"}  # the tasks whose prompts show an image
    assert all(abs(v) < 1e3 for v in metrics["lm_image_nats"].values())
    rows = Path(cfg.loss_csv).read_text().splitlines()
    assert rows[0] == "step,phase,loss" and len(rows) == 1 + cfg.lm_steps + cfg.dm_steps
    assert [r.split(",")[1] for r in rows[1:]] == ["lm"] * 2 + ["dm"] * 3
    assert all(float(r.split(",")[2]) > 0 for r in rows[1:])
    for p in (cfg.loss_plot, cfg.grid_path):
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # checkpoints at steps 2 (LM end), 4, 5 (end); keep_last=2
    assert sorted(p.name for p in Path(cfg.run_dir).glob("step-*")) == ["step-000004", "step-000005"]
    # MLflow: losses and lr every step, checkpoints as logged models with step / seed / data version
    import mlflow

    client = mlflow.MlflowClient()
    run_id = summary["run_url"].rsplit("/", 1)[-1]
    hist = client.get_metric_history(run_id, "loss/dm")
    assert [m.step for m in hist] == [3, 4, 5]
    assert [m.step for m in client.get_metric_history(run_id, "lr/dit")] == [3, 4, 5]
    assert len(client.get_metric_history(run_id, "loss/lm")) == 2
    exp = client.get_experiment_by_name("sft-test")
    models = mlflow.search_logged_models(experiment_ids=[exp.experiment_id], output_format="list")
    assert sorted(int(m.tags["step"]) for m in models) == [2, 4, 5]
    assert all(m.tags["seed"] == "0" for m in models)


def test_image_information_is_zero_when_every_example_shows_the_same_image(project: Path) -> None:
    torch.manual_seed(0)
    model = UnifiedModel.build(load_model_config("tiny"), load_tokenizer(project / "tokenizer")).eval()
    data = D.load_lm_data(project / "data" / "shards", D.LM_TASKS, "train", 0.0, 32)
    seen = D.image_information(model, data, per_task=4)
    assert set(seen) == {"understand", "reflect"}  # text-only tasks are left out
    assert all(v != 0.0 for v in seen.values())  # a random LM's likelihoods depend on the image it is shown
    one = next(e.image for e in data["reflect"] if e.image is not None)
    same = {t: [dataclasses.replace(e, image=one) for e in data[t] if e.image is not None] for t in ("reflect",)}
    assert D.image_information(model, same, per_task=4) == {"reflect": 0.0}  # swapping equal images changes nothing


def test_gradients_reach_exactly_each_phase_parameters(project: Path, tmp_path: Path) -> None:
    cfg = small_cfg(project, tmp_path)
    torch.manual_seed(0)
    model = UnifiedModel.build(load_model_config("tiny"), load_tokenizer(cfg.tokenizer_dir))
    groups = {k: {n for n, _ in v} for k, v in model.parameter_groups().items()}
    lm_data = D.load_lm_data(cfg.shards_dir, D.LM_TASKS, "train", 0.0, 32)
    dm = D.load_dm_data(model, cfg.shards_dir, 0.0, 32)

    def grads() -> tuple[set[str], set[str]]:
        got = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        none = {n for n, p in model.named_parameters() if p.grad is None}
        return got, none

    # LM phase: LM + vision tower, nothing else
    engine = _phase_engine(model, cfg, "lm")
    assert {n for n, _ in engine.trainable} == groups["lm"] | groups["vision"]
    batch = [lm_data["understand"][0], lm_data["reflect"][0], lm_data["prompt_refine"][0]]
    lm_loss(model, [e.prompt for e in batch], [e.response for e in batch], [e.image for e in batch]).backward()
    got, none = grads()
    assert got <= groups["lm"] | groups["vision"]
    assert any(n in got for n in groups["vision"])
    assert "lm.model.language_model.layers.0.self_attn.q_proj.weight" in got
    assert none >= set().union(*(groups[k] for k in ("dit", "connector", "t2i_queries", "i2i_queries", "ref",
                                                     "vae")))
    model.zero_grad(set_to_none=True)

    # DM phase: DiT + connector + queries + ref path; the LM is frozen but passes gradients to the queries
    engine = _phase_engine(model, cfg, "dm")
    dm_names = set().union(*(groups[k] for k in ("dit", "connector", "t2i_queries", "i2i_queries", "ref")))
    assert {n for n, _ in engine.trainable} == dm_names
    assert engine.group_names == ["dit", "connector", "queries", "ref"]
    gen = torch.Generator().manual_seed(0)
    cond = model.encode(dm.t2i_prompts[:2], None, "t2i")
    flow_matching_loss(model, dm.t2i_latents[:2], cond, generator=gen, drop_text=0, drop_ref=0, drop_both=0).backward()
    got, none = grads()
    assert "t2i_queries" in got and "i2i_queries" in none
    assert groups["connector"] <= got
    assert none >= groups["lm"] | groups["vision"]  # frozen: no grad at all
    cond = model.encode(dm.edit_prompts[:2], dm.edit_images[:2], "i2i")
    flow_matching_loss(model, dm.edit_tgt[:2], cond, dm.edit_src[:2], generator=gen, drop_text=0, drop_ref=0,
                       drop_both=0).backward()
    got, none = grads()
    assert "i2i_queries" in got and "ref_proj.weight" in got
    assert got <= dm_names and none >= groups["lm"] | groups["vision"] | groups["vae"]
    assert groups["vae"]  # the tiny profile's DiT works in the autoencoder's latents


def test_missing_and_corrupt_checkpoints_give_clear_errors(project: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        run_sft(small_cfg(project, tmp_path, resume_from=str(missing)))
    cfg = small_cfg(project, tmp_path / "a", dm_steps=0, eval_per_tag=1)
    run_sft(cfg)
    ckpt = Path(cfg.run_dir) / "step-000002"
    with (ckpt / "model.safetensors").open("r+b") as f:  # flip bytes in the middle of the weights
        f.seek(4096)
        f.write(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="other settings \\(dm_steps differ\\)"):
        run_sft(dataclasses.replace(cfg, dm_steps=2))  # a stale run_dir is not resumed with other settings
    with pytest.raises(CheckpointError, match="corrupt"):
        run_sft(dataclasses.replace(cfg, max_minutes=5.0))


def _worker(cfg: SFTConfig, out: Path) -> list[str]:
    return [sys.executable, str(WORKER), "--config", json.dumps(to_dict(cfg)), "--out", str(out)]


def _env() -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    return dict(base, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def test_run_directory_follows_the_architecture_not_the_sampling_settings(tmp_path: Path) -> None:
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())

    def run_dir(edit) -> str:
        profile = copy.deepcopy(tiny)
        edit(profile)
        path = tmp_path / "profile.yaml"  # one path: the profile name is part of the signature
        path.write_text(yaml.safe_dump(profile))
        return resolve_run_dir(SFTConfig(profile=str(path), shards_dir=str(tmp_path / "none"))).run_dir

    same = run_dir(lambda p: None)
    # a new guidance default re-evaluates the finished run: training never reads the sampling settings
    assert run_dir(lambda p: p["sampling"].update(cfg_scale=7.0, cfg_schedule="constant")) == same
    # another architecture is another run: its checkpoints would not fit
    assert run_dir(lambda p: p["dit"]["config"].update(num_layers=2)) != same


@pytest.mark.slow
def test_resume_after_sigkill_matches_uninterrupted_run(project: Path, tmp_path: Path) -> None:
    kw = dict(lm_steps=2, dm_steps=10, checkpoint_interval=2, eval_per_tag=1, eval_lm_per_task=1, ema_decay=0.9)
    ref_cfg = small_cfg(project, tmp_path / "ref", **kw)
    # Every run in a fresh process, so that no state left by other tests in this process changes the numerics.
    subprocess.run(_worker(ref_cfg, tmp_path / "wref"), env=_env(), cwd=ROOT, check=True, timeout=300)
    cfg = small_cfg(project, tmp_path / "killed", **kw)
    proc = subprocess.Popen(_worker(cfg, tmp_path / "w"), env=_env(), cwd=ROOT)
    target = Path(cfg.run_dir) / "step-000006"  # a DM-phase checkpoint, well before the end (step 12)
    deadline = time.time() + 120
    while not (target / "checkpoint.json").exists():
        assert proc.poll() is None, "worker exited before its step-6 checkpoint"
        assert time.time() < deadline, "worker never wrote step-000006"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not Path(cfg.out_dir).exists(), "the killed run must not have finished"
    done = sorted(p.name for p in Path(cfg.run_dir).glob("step-*") if (p / "checkpoint.json").exists())
    assert done[-1] < "step-000012"
    subprocess.run(_worker(cfg, tmp_path / "w2"), env=_env(), cwd=ROOT, check=True, timeout=300)  # resumes
    ref = load_file(str(Path(ref_cfg.out_dir) / "model.safetensors"))
    got = load_file(str(Path(cfg.out_dir) / "model.safetensors"))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k
    ref_rows = Path(ref_cfg.loss_csv).read_text().splitlines()
    assert Path(cfg.loss_csv).read_text().splitlines() == ref_rows  # the loss history survives the kill
    # The saved model is the DM phase's weight average: the DiT differs from the last step's iterate, the LM not.
    last = load_checkpoint(Path(ref_cfg.run_dir) / "step-000012").model_state  # tied weights restored too
    dit = [k for k in ref if k.startswith("dit.")]
    lm = [k for k in ref if k.startswith("lm.")]
    assert dit and lm
    assert any(not torch.equal(ref[k], last[k]) for k in dit)
    assert all(torch.equal(ref[k], last[k]) for k in lm)


@pytest.mark.slow
def test_two_processes_end_with_identical_parameters(project: Path, tmp_path: Path) -> None:
    """`unirl sft` with `processes: 2` relaunches itself under torchrun; both ranks end with the same parameters."""
    cfg = small_cfg(project, tmp_path, lm_steps=2, dm_steps=2, eval_lm_per_task=1, processes=2)
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"sft": to_dict(cfg)}))
    proc = subprocess.run([sys.executable, "-m", "unirl.cli", "--params", str(params), "sft"], env=_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-m torch.distributed.run --standalone --nproc_per_node 2 -m unirl.cli --params" in proc.stdout
    digests = [json.loads(line)["param_digest"] for line in proc.stdout.splitlines() if line.startswith('{"out_dir"')]
    assert len(digests) == 2 and digests[0] == digests[1]  # one summary per rank
    assert UnifiedModel.from_pretrained(cfg.out_dir) is not None  # rank 0 saved the model
    shutil.rmtree(tmp_path / "run")


@pytest.mark.slow
def test_deepspeed_engine_matches_torch_engine(project: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    kw = dict(lm_steps=2, dm_steps=2, eval_lm_per_task=1)
    ref = small_cfg(project, tmp_path / "torch", **kw)
    run_sft(ref)
    cfg = small_cfg(project, tmp_path / "ds", engine=EngineConfig(backend="deepspeed"), **kw)
    run_sft(cfg)  # ZeRO-2 keeps parameters as views of flat buffers: the final save must still work
    a = load_file(str(Path(ref.out_dir) / "model.safetensors"))
    b = load_file(str(Path(cfg.out_dir) / "model.safetensors"))
    assert a.keys() == b.keys()
    # Same AdamW arithmetic, but DeepSpeed sums gradients in flat buffers (another float reduction order), and
    # Adam's normalisation turns those ~1e-7 gradient differences on near-zero gradients into steps of up to
    # ~lr/20 (lr 2e-3 here; measured 1.0e-4 at most, on a cross-attention output weight). A wrong gradient would
    # move every parameter by ~lr per step.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=2.5e-4, msg=k)


def test_a_run_the_guard_stopped_trains_no_further_when_rerun(project: Path, tmp_path: Path) -> None:
    """The wall-time guard counts the time a run's earlier invocations spent (stored in its checkpoints): rerun
    with the same settings (what `dvc repro` does after a code change), a run the guard stopped evaluates its
    weights again instead of training another budget's worth of steps. Raising the guard continues it."""
    cfg = small_cfg(project, tmp_path, dm_steps=6, ema_decay=0.0, max_minutes=1e-6)  # stops after DM step 1
    first = run_sft(cfg)["metrics"]
    assert first["stopped_early"]
    run = Path(cfg.run_dir)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000003"]
    assert load_checkpoint(run / "step-000003").extra["elapsed_s"] > 0
    weights = load_file(str(Path(cfg.out_dir) / "model.safetensors"))
    again = run_sft(cfg)["metrics"]
    assert again["stopped_early"] and again["train_minutes"] > first["train_minutes"]
    assert sorted(p.name for p in run.glob("step-*")) == ["step-000002", "step-000003"]
    after = load_file(str(Path(cfg.out_dir) / "model.safetensors"))
    assert all(torch.equal(weights[k], after[k]) for k in weights)
    longer = run_sft(dataclasses.replace(cfg, max_minutes=60.0))["metrics"]  # a larger budget: on to the end
    assert not longer["stopped_early"] and (run / "step-000008").is_dir()
