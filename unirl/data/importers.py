"""Import existing datasets on disk into the shard schema (records for :func:`unirl.data.shard_writer.write_shards`).

Two layouts are read, nothing is fetched from a hub:

* image-caption WebDataset tars: per key an image (``jpg``/``jpeg``/``png``/``webp``) and a caption, either ``txt``
  or ``json`` with a ``caption``/``text``/``prompt`` field -> task ``t2i``, tag ``caption``, ``metadata`` None;
* editing parquet files (as Hugging Face ``datasets`` writes them): a source image, an edited image and an
  instruction column, images as raw bytes or ``{"bytes": ..., "path": ...}`` structs -> task ``edit``, tag
  ``imported``, images ``src.png``/``tgt.png``.

Images are converted to RGB, scaled so the shorter side equals the resolution and centre-cropped to a square
(:func:`fit_square`, the usual resize-then-centre-crop of diffusion training data). Every problem (unreadable
file, missing column or caption, undecodable image, empty text) raises :class:`ImportDataError` naming the file
and the sample key or row.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from unirl.data.shards import Record, ShardError, open_checked_tar, read_member, split_member

CAPTION_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_FIELDS = ("caption", "text", "prompt")
SOURCE_COLUMNS = ("source_image", "input_image", "src", "source", "original_image", "image")
TARGET_COLUMNS = ("edited_image", "output_image", "target", "tgt", "target_image", "edited")
INSTRUCTION_COLUMNS = ("instruction", "edit_prompt", "prompt", "edit_instruction", "text")


class ImportDataError(ValueError):
    """A source dataset that cannot be imported; the message names the file and the key or row."""


def _expand(paths: str | os.PathLike | Iterable[str | os.PathLike], suffix: str) -> list[Path]:
    """Files from a path, a directory (its ``*suffix`` files, sorted) or a list of them."""
    items = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    out: list[Path] = []
    for p in map(Path, items):
        if p.is_dir():
            out.extend(sorted(p.glob(f"*{suffix}")))
        elif p.exists():
            out.append(p)
        else:
            raise ImportDataError(f"{p}: no such file or directory")
    if not out:
        raise ImportDataError(f"no {suffix} files found in {items}")
    return out


def fit_square(image: Image.Image, resolution: int) -> Image.Image:
    """RGB ``resolution`` x ``resolution`` image: shorter side scaled to ``resolution`` (bicubic), then centre crop.

    Transparent images are composited over white first.
    """
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    else:
        img = image.convert("RGB")
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _decode(data: bytes, where: str) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        return img
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken data
        raise ImportDataError(f"{where}: image does not decode ({e})") from e


def _caption(parts: dict[str, bytes], where: str) -> str:
    if "txt" in parts:
        try:
            text = parts["txt"].decode("utf-8")
        except UnicodeDecodeError as e:
            raise ImportDataError(f"{where}: 'txt' caption is not UTF-8 ({e})") from e
    elif "json" in parts:
        try:
            obj = json.loads(parts["json"].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImportDataError(f"{where}: invalid JSON ({e})") from e
        fields = [f for f in CAPTION_FIELDS if isinstance(obj, dict) and isinstance(obj.get(f), str)]
        if not fields:
            raise ImportDataError(f"{where}: JSON has none of the caption fields {list(CAPTION_FIELDS)}")
        text = obj[fields[0]]
    else:
        raise ImportDataError(f"{where}: no caption ('txt' or 'json' member); has {sorted(parts)}")
    text = " ".join(text.split())
    if not text:
        raise ImportDataError(f"{where}: empty caption")
    return text


def import_caption_tars(
    paths: str | os.PathLike | Iterable[str | os.PathLike], resolution: int, *, tag: str = "caption"
) -> Iterator[Record]:
    """Records (task ``t2i``) from image-caption WebDataset tars (files, or directories of ``*.tar``).

    ``meta`` holds ``task``, ``tag``, ``prompt`` (the caption, whitespace folded), ``resolution``,
    ``metadata: None`` and ``source`` (``{"file": <name>, "key": <key>}``).
    """
    for path in _expand(paths, ".tar"):
        try:
            tf, groups = open_checked_tar(path)
        except ShardError as e:
            raise ImportDataError(str(e)) from e
        with tf:
            for group in groups:
                key = split_member(group[0].name)[0]
                where = f"{path}: sample {key!r}"
                try:
                    parts = {split_member(m.name)[1].lower(): read_member(tf, m, path, key) for m in group}
                except ShardError as e:
                    raise ImportDataError(str(e)) from e
                ext = next((e for e in CAPTION_IMAGE_EXTS if e in parts), None)
                if ext is None:
                    raise ImportDataError(f"{where}: no image member (one of {list(CAPTION_IMAGE_EXTS)}); "
                                          f"has {sorted(parts)}")
                caption = _caption(parts, where)
                image = fit_square(_decode(parts[ext], f"{where} ({ext})"), resolution)
                meta = {"task": "t2i", "tag": tag, "prompt": caption, "resolution": resolution, "metadata": None,
                        "source": {"file": path.name, "key": key}}
                yield Record(task="t2i", images={"png": image}, meta=meta)


def _pick(columns: Sequence[str], given: str | None, candidates: Sequence[str], what: str, path: Path) -> str:
    if given is not None:
        if given not in columns:
            raise ImportDataError(f"{path}: {what} column {given!r} not found; columns are {list(columns)}")
        return given
    for c in candidates:
        if c in columns:
            return c
    raise ImportDataError(f"{path}: no {what} column (looked for {list(candidates)}; columns are {list(columns)}); "
                          f"pass {what}_column=...")


def _image_bytes(value: Any, where: str, base: Path) -> bytes:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return bytes(value["bytes"])
        if value.get("path"):
            p = Path(value["path"])
            p = p if p.is_absolute() else base / p
            if p.is_file():
                return p.read_bytes()
            raise ImportDataError(f"{where}: image struct has no bytes and its path {str(p)!r} does not exist")
    if value is None:
        raise ImportDataError(f"{where}: image is null")
    raise ImportDataError(f"{where}: image must be bytes or a {{'bytes': ...}} struct, got {type(value).__name__}")


def import_edit_parquet(
    paths: str | os.PathLike | Iterable[str | os.PathLike],
    resolution: int,
    *,
    source_column: str | None = None,
    target_column: str | None = None,
    instruction_column: str | None = None,
    tag: str = "imported",
    batch_size: int = 64,
) -> Iterator[Record]:
    """Records (task ``edit``, images ``src.png``/``tgt.png``) from editing parquet files (or directories of them).

    Columns are found among common names (:data:`SOURCE_COLUMNS`, :data:`TARGET_COLUMNS`,
    :data:`INSTRUCTION_COLUMNS`) unless given. ``meta`` holds ``task``, ``tag``, ``prompt`` (the instruction),
    ``resolution``, ``metadata: None`` and ``source`` (``{"file": <name>, "row": <index>}``).
    """
    for path in _expand(paths, ".parquet"):
        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ...
            raise ImportDataError(f"{path}: not a readable parquet file ({e})") from e
        columns = pf.schema_arrow.names
        src_col = _pick(columns, source_column, SOURCE_COLUMNS, "source", path)
        tgt_col = _pick(columns, target_column, TARGET_COLUMNS, "target", path)
        ins_col = _pick(columns, instruction_column, INSTRUCTION_COLUMNS, "instruction", path)
        row = 0
        for batch in pf.iter_batches(batch_size=batch_size, columns=[src_col, tgt_col, ins_col]):
            data = batch.to_pydict()
            for src, tgt, ins in zip(data[src_col], data[tgt_col], data[ins_col]):
                where = f"{path}: row {row}"
                text = " ".join(ins.split()) if isinstance(ins, str) else ""
                if not text:
                    raise ImportDataError(f"{where}: empty or missing instruction in column {ins_col!r}")
                images = {
                    "src.png": fit_square(_decode(_image_bytes(src, f"{where} ({src_col})", path.parent),
                                                  f"{where} ({src_col})"), resolution),
                    "tgt.png": fit_square(_decode(_image_bytes(tgt, f"{where} ({tgt_col})", path.parent),
                                                  f"{where} ({tgt_col})"), resolution),
                }
                meta = {"task": "edit", "tag": tag, "prompt": text, "resolution": resolution, "metadata": None,
                        "source": {"file": path.name, "row": row}}
                yield Record(task="edit", images=images, meta=meta)
                row += 1
