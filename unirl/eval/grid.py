"""Sample grids: the pictures people look at (shard previews, SFT samples, before/after RL)."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from unirl.atomic import atomic_output


def make_grid(
    images: Sequence[Image.Image],
    captions: Sequence[str] | None = None,
    cols: int = 8,
    cell: int = 96,
    caption_lines: int = 3,
) -> Image.Image:
    """Tile ``images`` into a grid; each is upscaled (nearest) to ``cell`` px with its caption wrapped underneath."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"got {len(images)} images but {len(captions)} captions")
    cols = max(1, min(cols, len(images)))
    rows = (len(images) + cols - 1) // cols
    font = ImageFont.load_default()
    line_h = 11
    text_h = caption_lines * line_h + 4 if captions is not None else 0
    pad = 4
    grid = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + text_h + pad) + pad), (250, 250, 250))
    draw = ImageDraw.Draw(grid)
    wrap = max(8, cell // 6)
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        x, y = pad + c * (cell + pad), pad + r * (cell + text_h + pad)
        grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        if captions is not None:
            lines = textwrap.wrap(captions[i], wrap)[:caption_lines]
            for k, line in enumerate(lines):
                draw.text((x, y + cell + 2 + k * line_h), line, fill=(20, 20, 20), font=font)
    return grid


def save_image_atomic(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save a PNG via a temporary file and rename, so readers never see a partial file."""
    with atomic_output(path) as tmp:
        image.save(tmp, format="PNG")
    return Path(path)
