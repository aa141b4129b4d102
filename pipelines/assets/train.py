"""Model assets: the tokenizer, the autoencoder, the SFT model and one GRPO model per scenario.

SFT and RL run as external processes through Dagster Pipes (`pipelines.launch.StageLauncher`), the same entry point
`dvc repro` runs, so on a cluster the launcher prefix becomes `torchrun`/`deepspeed` without touching the asset.
"""


import json
from pathlib import Path

import dagster as dg
from dagster import AssetExecutionContext

from pipelines.launch import StageLauncher
from pipelines.resources import UnirlParams, image_md
from unirl.cli import SCENARIOS, load_stage_config
from unirl.models.tokenizer import TokenizerConfig, build_tokenizer
from unirl.train.vae import VAEStageConfig, train_vae


@dg.asset(group_name="model", deps=["tokenizer_corpus"], kinds={"transformers"},
          description="Byte-level BPE tokenizer trained on the curated corpus, with the model's special tokens.")
def tokenizer(unirl: UnirlParams) -> dg.MaterializeResult:
    cfg = unirl.config(TokenizerConfig, "tokenizer")
    metrics = build_tokenizer(cfg)
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(cfg.out_dir), **metrics})


@dg.asset(group_name="model", deps=["shards_t2i", "shards_edit"], kinds={"pytorch", "diffusers", "mlflow"},
          description="The profile's DC-AE (AutoencoderDC), trained on the curated images; the DiT denoises its "
                      "latents.")
def vae(unirl: UnirlParams) -> dg.MaterializeResult:
    cfg = unirl.config(VAEStageConfig, "vae")
    train_vae(cfg)
    meta = _summary_metadata(Path(cfg.metrics_path), {"reconstructions": Path(cfg.grid_path)})
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(cfg.out_dir), **meta})


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _summary_metadata(summary_path: Path, images: dict[str, Path]) -> dict[str, object]:
    """Metadata from a stage's summary JSON (flat numbers, the MLflow link) and its pictures."""
    meta: dict[str, object] = {}
    if summary_path.exists():
        summary = json.loads(summary_path.read_text())
        for key, value in _flatten(summary).items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                meta[key] = float(value)
        url = summary.get("run_url") or summary.get("mlflow_run_url")
        if url:
            meta["mlflow_run"] = dg.MetadataValue.url(url)
        meta["summary"] = dg.MetadataValue.json(summary)
    for name, path in images.items():
        if path.exists():
            meta[name] = image_md(path, name)
    return meta


@dg.asset(group_name="model", deps=["tokenizer", "vae", *(f"shards_{t}" for t in SCENARIOS)],
          kinds={"pytorch", "mlflow"},
          description="SFT: LM cold start (cross-entropy on task formats), then DM flow matching with the LM frozen.")
def sft_model(context: AssetExecutionContext, unirl: UnirlParams, launcher: StageLauncher) -> dg.MaterializeResult:
    launcher.run(context, "sft", unirl.params_path)
    cfg = load_stage_config("sft", unirl.params_path)
    reports = Path(cfg.metrics_path).parent
    meta = _summary_metadata(Path(cfg.metrics_path), {"loss_curve": Path(cfg.loss_plot),
                                                     "samples": Path(cfg.grid_path)})
    return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(cfg.out_dir),
                                          "reports": dg.MetadataValue.path(str(reports)), **meta})


def _rl_asset(scenario: str) -> dg.AssetsDefinition:
    @dg.asset(name=f"rl_{scenario}", group_name="rl", deps=["sft_model"], kinds={"pytorch", "mlflow"},
              description=f"GRPO in the `{scenario}` scenario, from the SFT model.")
    def _rl(context: AssetExecutionContext, unirl: UnirlParams, launcher: StageLauncher) -> dg.MaterializeResult:
        launcher.run(context, "rl", unirl.params_path, ["--scenario", scenario])
        cfg = load_stage_config("rl", unirl.params_path, scenario=scenario).with_outputs()
        reports = Path(cfg.reports_dir)
        meta = _summary_metadata(reports / "metrics.json", {"reward_curve": reports / "reward_curve.png",
                                                            "before_after": reports / "samples_before_after.png"})
        return dg.MaterializeResult(metadata={"path": dg.MetadataValue.path(cfg.out_dir), **meta})

    return _rl


RL_ASSETS = [_rl_asset(s) for s in SCENARIOS]
