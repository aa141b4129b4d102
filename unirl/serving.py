"""Serving flavour: a unified-model checkpoint as an MLflow pyfunc that turns prompts into images.

The registered model is the checkpoint directory (``save_pretrained`` layout) logged with
:func:`unirl.tracking.log_pyfunc_checkpoint` and :data:`SERVING_LOADER`, so ``mlflow.pyfunc.load_model`` and
``mlflow models serve -m models:/<name>@champion --env-manager local`` load it through
:class:`~unirl.tracking.UnifiedCheckpointModel` into an :class:`ImageGenerator`.

Request (a DataFrame, e.g. ``{"dataframe_records": [...]}`` over HTTP), one row per image:

- ``prompt`` (string, required): the text-to-image prompt;
- ``image`` (string, optional): a base64 PNG; the row is then an edit of that image (task ``i2i``);
- ``instruction`` (string, optional): the edit instruction (defaults to ``prompt`` when an image is given).

Params (optional, ``{"params": {...}}``): ``steps``, ``cfg_scale``, ``ref_cfg_scale`` (defaults: the checkpoint's
``config.sampling``) and ``seed`` (row i is sampled with :func:`unirl.eval.benchmarks.sample_seed` ``(seed, i)``,
the benchmarks' rule, so a served image can be reproduced exactly). Response: a DataFrame with one column
``image``, base64 PNGs at the model resolution.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image

__all__ = [
    "SERVING_LOADER",
    "SERVING_REQUIREMENTS",
    "ImageGenerator",
    "decode_png_b64",
    "encode_png_b64",
    "load_generator",
    "log_serving_model",
    "request_json",
    "serving_signature",
]

SERVING_LOADER = "unirl.serving:load_generator"
SERVING_REQUIREMENTS: tuple[str, ...] = (
    "mlflow", "torch", "safetensors", "numpy", "pyyaml", "transformers", "diffusers", "tokenizers", "pillow",
    "pandas", "scipy",
)  # fmt: skip


def encode_png_b64(image: Image.Image) -> str:
    """PIL image -> base64 text of its PNG bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def decode_png_b64(text: str) -> Image.Image:
    """Base64 PNG (or any PIL-readable image) text -> RGB PIL image, with a clear error for bad input."""
    try:
        with Image.open(io.BytesIO(base64.b64decode(text, validate=True))) as im:
            return im.convert("RGB")
    except (ValueError, OSError) as e:
        raise ValueError(f"column 'image' must hold a base64-encoded PNG ({e})") from e


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value)) and str(value) != ""


class ImageGenerator:
    """``predict(DataFrame[prompt, image?, instruction?], params) -> DataFrame[image]`` over a UnifiedModel."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def predict(self, model_input: Any, params: Mapping[str, Any] | None = None) -> pd.DataFrame:
        from unirl.eval.benchmarks import Sampling, sample_images, sample_seed

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in df.columns:
            raise ValueError(f"the request needs a 'prompt' column; got columns {list(df.columns)}")
        p = dict(params or {})
        unknown = sorted(set(p) - {"steps", "cfg_scale", "ref_cfg_scale", "seed"})
        if unknown:
            raise ValueError(f"unknown param(s) {unknown}; known: steps, cfg_scale, ref_cfg_scale, seed")
        sampling = Sampling.for_model(self.model, p.get("steps"), p.get("cfg_scale"), p.get("ref_cfg_scale"),
                                      int(p.get("seed", 0) or 0))
        rows = df.to_dict("records")
        out: list[str | None] = [None] * len(rows)
        edits = [i for i, r in enumerate(rows) if _present(r.get("image"))]
        t2i = [i for i in range(len(rows)) if i not in set(edits)]
        if t2i:
            imgs = sample_images(self.model, [str(rows[i]["prompt"]) for i in t2i],
                                 [sample_seed(sampling.seed, i) for i in t2i], sampling)
            for i, im in zip(t2i, imgs):
                out[i] = encode_png_b64(im)
        if edits:
            texts = [str(rows[i]["instruction"] if _present(rows[i].get("instruction")) else rows[i]["prompt"])
                     for i in edits]
            sources = [decode_png_b64(str(rows[i]["image"])) for i in edits]
            imgs = sample_images(self.model, texts, [sample_seed(sampling.seed, i) for i in edits], sampling,
                                 images=sources, task="i2i")
            for i, im in zip(edits, imgs):
                out[i] = encode_png_b64(im)
        return pd.DataFrame({"image": out})


def load_generator(path: str | os.PathLike) -> ImageGenerator:
    """The serving loader: a ``save_pretrained`` directory -> :class:`ImageGenerator` (CPU)."""
    from unirl.models.unified import UnifiedModel

    return ImageGenerator(UnifiedModel.from_pretrained(path))


def serving_signature(ckpt_dir: str | os.PathLike) -> Any:
    """The pyfunc signature: columns prompt / image? / instruction? -> image, params with the checkpoint defaults."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from unirl.models.io import read_config

    s = read_config(ckpt_dir)["model_config"]["sampling"]
    inputs = Schema([ColSpec("string", "prompt"), ColSpec("string", "image", required=False),
                     ColSpec("string", "instruction", required=False)])
    params = ParamSchema([ParamSpec("steps", "long", int(s["steps"])),
                          ParamSpec("cfg_scale", "double", float(s["cfg_scale"])),
                          ParamSpec("ref_cfg_scale", "double", float(s["ref_cfg_scale"])),
                          ParamSpec("seed", "long", 0)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec("string", "image")]), params=params)


def log_serving_model(ckpt_dir: str | os.PathLike, name: str, tags: Mapping[str, str] | None = None,
                      params: Mapping[str, str] | None = None) -> Any:
    """Log ``ckpt_dir`` into the active MLflow run as the serving pyfunc model; returns MLflow's ``ModelInfo``."""
    from unirl.tracking import log_pyfunc_checkpoint

    ckpt_dir = Path(ckpt_dir)
    example = pd.DataFrame([{"prompt": "a photo of a red circle"}])
    return log_pyfunc_checkpoint(ckpt_dir, name, loader=SERVING_LOADER, tags=tags, params=params,
                                 signature=serving_signature(ckpt_dir), input_example=example,
                                 requirements=SERVING_REQUIREMENTS)


def request_json(prompts: list[str], **params: Any) -> str:
    """The HTTP body ``mlflow models serve`` expects for ``prompts`` (and optional params)."""
    body: dict[str, Any] = {"dataframe_records": [{"prompt": p} for p in prompts]}
    if params:
        body["params"] = params
    return json.dumps(body)
