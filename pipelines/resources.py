"""Resources shared by the assets: where params.yaml lives, and the stage-config loader."""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import Any, TypeVar

import dagster as dg

from unirl.config import load_config

T = TypeVar("T")


class UnirlParams(dg.ConfigurableResource):
    """The params file every stage reads (the same one `dvc repro` and the `unirl` CLI read)."""

    params_path: str = os.environ.get("UNIRL_PARAMS", "params.yaml")

    def config(self, cls: type[T], section: str, **overrides: Any) -> T:
        return load_config(cls, section, self.params_path, overrides or None)


def image_md(path: str | os.PathLike, alt: str = "preview") -> dg.MetadataValue:
    """A PNG shown inline in the Dagster UI (markdown with a data URI)."""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{data})")


def pil_md(image: Any, alt: str = "preview") -> dg.MetadataValue:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")
