"""Model profiles: the architecture of the unified model, read from ``configs/<profile>.yaml``.

A profile names, for each expert, either a local pretrained directory (``path``) or the constructor kwargs of the
library class (``config``): transformers' ``Qwen2_5_VLConfig`` (``text_config`` + ``vision_config``), diffusers'
``SanaTransformer2DModel`` and ``AutoencoderDC``. ``vae.path`` and ``vae.config`` both null means pixel space: the
DiT's "latents" are the RGB images in [-1, 1]. The tiny profile gives a ``vae.config`` that the ``vae`` stage trains
on the curated images; the full profile loads SANA's DC-AE from ``vae.path``. Token ids (image pad, vision
start/end, EOS, pad, vocabulary size) are filled in from the tokenizer at build time, never written in a profile.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import yaml

from unirl.config import PROJECT_ROOT, from_dict, option

CONFIGS_DIR = PROJECT_ROOT / "configs"


@dataclasses.dataclass
class LMConfig:
    path: str | None = option(None, "local Qwen2.5-VL directory (from_pretrained); null: build from `config`")
    config: dict = option({}, "Qwen2_5_VLConfig kwargs (text_config, vision_config, ...) when `path` is null")


@dataclasses.dataclass
class DiTConfig:
    path: str | None = option(None, "local SanaTransformer2DModel directory; null: build from `config`")
    config: dict = option({}, "SanaTransformer2DModel kwargs when `path` is null")


@dataclasses.dataclass
class VAEConfig:
    path: str | None = option(None, "local AutoencoderDC directory; null with empty config: pixel space")
    config: dict = option({}, "AutoencoderDC kwargs when `path` is null: the architecture the `vae` stage trains "
                                 "(SFT then loads its weights)")

    @property
    def pixel_space(self) -> bool:
        return self.path is None and not self.config


@dataclasses.dataclass
class ConnectorConfig:
    n_layers: int = option(2, "pre-norm transformer blocks in the connector")
    n_heads: int = option(4, "attention heads in the connector blocks")
    mlp_ratio: float = option(2.0, "SwiGLU hidden width as a multiple of the LM width")


CFG_SCHEDULES: tuple[str, ...] = ("constant", "linear")


@dataclasses.dataclass
class SamplingConfig:
    steps: int = option(20, "Euler steps for image generation")
    shift: float = option(3.0, "flow-matching timestep shift: sigma' = shift*s/(1+(shift-1)*s)")
    cfg_scale: float = option(4.5, "text guidance scale w")
    ref_cfg_scale: float = option(1.5, "reference-image guidance scale w_ref (editing)")
    cfg_max_sigma: float = option(
        1.0, "text-to-image guidance interval: CFG applies only at noise levels sigma <= this, above it the "
        "conditional velocity alone (Kynkaanniemi et al. 2024); 1.0 = every step. Editing's triple CFG always "
        "guides every step (on the tiny profile the interval lowered held-out edit correctness)")
    cfg_schedule: str = option(
        "constant", "text guidance weight over the noise level sigma (t2i and the text term of editing's triple "
        "CFG; w_ref stays constant): 'constant' (w at every step) or 'linear' (w(sigma) = 1 + (w - 1)(1 - sigma): "
        "no guidance at pure noise, where the number and place of objects are decided, rising to w at the clean "
        "end; the linearly increasing schedule of Wang et al. 2024, 'Analysis of Classifier-Free Guidance Weight "
        "Schedulers')")

    def __post_init__(self) -> None:
        if self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"sampling.cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}, "
                             f"got {self.cfg_schedule!r}")


@dataclasses.dataclass
class ModelConfig:
    profile: str = option("tiny", "profile name")
    resolution: int = option(32, "generated image side in pixels")
    n_query: int = option(8, "learnable query tokens per task (t2i, i2i)")
    query_init_std: float | None = option(
        None, "std of the learnable queries at init; null: the std of the LM's input embeddings (so the prompt "
        "is not drowned out in a freshly initialised tiny LM); 1.0: the paper's torch.randn")
    dtype: str = option("float32", "parameter dtype: float32 or bfloat16")
    dit_self_attention: str = option(
        "linear", "DiT self-attention kernel: 'linear' (SANA's ReLU linear attention) or 'softmax' (diffusers' "
        "AttnProcessor2_0 on the same attn1 weights; cheap at a few hundred tokens)")
    vision_min_pixels: int = option(32 * 32, "Qwen2.5-VL image processor: min pixels after resize")
    vision_max_pixels: int = option(32 * 32, "Qwen2.5-VL image processor: max pixels after resize")
    lm: LMConfig = dataclasses.field(default_factory=LMConfig)
    dit: DiTConfig = dataclasses.field(default_factory=DiTConfig)
    vae: VAEConfig = dataclasses.field(default_factory=VAEConfig)
    connector: ConnectorConfig = dataclasses.field(default_factory=ConnectorConfig)
    sampling: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "model config") -> ModelConfig:
        return from_dict(cls, values, where)


def load_model_config(profile: str | os.PathLike = "tiny") -> ModelConfig:
    """Read a profile: a name in ``configs/`` (``tiny``, ``full``) or a path to a YAML file."""
    p = Path(profile)
    if p.suffix not in (".yaml", ".yml"):
        p = CONFIGS_DIR / f"{profile}.yaml"
    if not p.exists():
        known = sorted(x.stem for x in CONFIGS_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"model profile {str(profile)!r} not found at {p}; known profiles: {known}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"model profile {p} is not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"model profile {p} must be a mapping, got {type(data).__name__}")
    return ModelConfig.from_dict(data, str(p))
