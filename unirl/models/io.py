"""Save and load the unified model as a directory: ``config.json`` + ``model.safetensors`` + ``tokenizer/``.

``config.json`` holds the profile (:class:`ModelConfig`) and the resolved architecture of each expert (the
``Qwen2_5_VLConfig``, ``SanaTransformer2DModel`` and ``AutoencoderDC`` configs), so loading rebuilds the exact
architecture from the checkpoint alone (no ``lm.path`` etc. needed) and then loads every tensor strictly.
Weights are safetensors (never pickle); tied tensors (the LM's embedding / head) are stored once
(``safetensors.torch.save_model``). Writes are atomic: everything goes to a sibling temp directory that is then
renamed into place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderDC, SanaTransformer2DModel
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from unirl.atomic import staged_dir
from unirl.models.config import ModelConfig
from unirl.models.tokenizer import load_tokenizer
from unirl.models.unified import DTYPES, UnifiedModel, cast_parameters

FORMAT = "unirl-unified-model"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or corrupt."""


def _fix(path: Path) -> str:
    return (f"delete {path} and re-run the stage that writes it, or point to another checkpoint "
            "(e.g. the previous one logged in MLflow)")


def save_pretrained(model: UnifiedModel, path: str | os.PathLike) -> Path:
    with staged_dir(path) as tmp:
        record: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "model_config": model.config.to_dict(),
            "lm_config": model.lm.config.to_dict(),
            "dit_config": dict(model.dit.config),
            "vae_config": dict(model.vae.config) if model.vae is not None else None,
        }
        (tmp / CONFIG_FILE).write_text(json.dumps(record, indent=2, default=_json_default))
        save_model(model, str(tmp / WEIGHTS_FILE))
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    return Path(path)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, torch.dtype):
        return str(obj).removeprefix("torch.")
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__} in the model config")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint's ``config.json``, with clear errors for a missing directory/file or bad JSON."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"model checkpoint directory {p} does not exist; train it first (unirl sft / "
                                "dvc repro sft) or pass the path of an existing checkpoint")
    cfg_file = p / CONFIG_FILE
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing, so {p} is not a complete unirl checkpoint; {_fix(p)}")
    try:
        record = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e}); {_fix(p)}") from e
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{cfg_file} is not a unirl model config (format != {FORMAT!r}); {_fix(p)}")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{cfg_file} has format version {record.get('version')}, this code reads {VERSION}")
    return record


def load_pretrained(path: str | os.PathLike, device: torch.device | str | None = None) -> UnifiedModel:
    p = Path(path)
    record = read_config(p)
    weights = p / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{weights} is missing; {_fix(p)}")
    try:
        config = ModelConfig.from_dict(record["model_config"], f"{p / CONFIG_FILE}:model_config")
        lm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(record["lm_config"]))
        dit = SanaTransformer2DModel.from_config(record["dit_config"])
        vae = AutoencoderDC.from_config(record["vae_config"]) if record["vae_config"] else None
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p / CONFIG_FILE} does not describe a buildable model ({e}); {_fix(p)}") from e
    tok = load_tokenizer(p / TOKENIZER_DIR) if (p / TOKENIZER_DIR).is_dir() else None
    model = cast_parameters(UnifiedModel(config, lm, dit, vae, tok), DTYPES[config.dtype])
    try:
        missing, unexpected = load_model(model, str(weights), strict=False)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{weights} is corrupt or truncated ({e}); {_fix(p)}") from e
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match the architecture in {p / CONFIG_FILE}: missing "
                              f"{sorted(missing)[:5]}..., unexpected {sorted(unexpected)[:5]}...; {_fix(p)}")
    if device is not None:
        model.to(device)
    return model
