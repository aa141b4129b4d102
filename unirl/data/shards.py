"""Shard I/O: WebDataset tars ``<root>/<task>/<split>-%06d.tar``, their manifest and a checked reader.

Layout of one sample (WebDataset convention: every member of a sample is named ``<key>.<ext>``, members of one
sample are contiguous): ``<key>.json`` holds the metadata (a JSON object with at least ``task``, ``tag``, ``prompt``)
and each image is a PNG under its own extension (``png``, or ``src.png`` + ``tgt.png`` for editing). Keys carry no
dots, so the first dot of a member name always separates key and extension.

Writing (:func:`unirl.data.shard_writer.write_shards`) is deterministic and atomic per task: byte-identical tars
for the same samples in the same order, swapped in with renames.

Reading iterates each tar with :mod:`tarfile` grouped by key, so every problem is attributed to its shard file and
sample key. Before a shard's samples are read its structure is checked (headers readable, every member's data
inside the file, an end-of-archive block present): a truncated or corrupt tar is always fatal, since an unknown
number of its samples is lost. Per-sample problems (missing ``json`` or required image, invalid JSON, undecodable
image, wrong image size, duplicate key) are fatal by default; with ``max_bad_fraction > 0`` they are skipped,
counted in :class:`ReadStats` and logged, and the read fails once the skipped share exceeds the fraction.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from unirl.atomic import atomic_write_json

log = logging.getLogger(__name__)

KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,96}$")
SPLIT_RE = re.compile(r"^[a-z0-9_]+$")
SHARD_RE = re.compile(r"^(?P<split>[a-z0-9_]+)-(?P<index>\d{6})\.tar$")
IMAGE_EXTS = ("png", "jpg", "jpeg", "webp")
# Image extensions each task's samples must carry (others: images optional). Override with ``required_images``.
REQUIRED_IMAGES: dict[str, tuple[str, ...]] = {
    "t2i": ("png",), "t2i_cot": ("png",), "prompt_refine": ("png",), "reflect": ("png",),
    "edit": ("src.png", "tgt.png"),
}
FIXED_MTIME = 0.0


class ShardError(ValueError):
    """A shard set that cannot be read as expected; the message names the shard file and, if known, the key."""


class SampleLike(Protocol):
    """Anything with the fields of ``unirl.data.tasks.Sample``."""

    task: str
    images: dict[str, Image.Image]
    meta: dict[str, Any]


@dataclass
class Record:
    """A minimal sample record (what the importers yield): task, images by extension, JSON metadata."""

    task: str
    images: dict[str, Image.Image]
    meta: dict[str, Any]


@dataclass
class ShardSample:
    """One sample read back from a shard."""

    key: str
    task: str
    images: dict[str, Any]  # extension -> PIL image (decode=True) or raw bytes (decode=False)
    meta: dict[str, Any]
    shard: str
    extras: dict[str, bytes] = field(default_factory=dict)  # members that are neither json nor an image


@dataclass
class ReadStats:
    """Counts of one pass of a :class:`ShardReader`."""

    expected: int = 0  # samples in the shards (distinct keys), counted from the tar headers before reading
    read: int = 0  # good samples yielded
    skipped: int = 0  # bad samples skipped
    reasons: Counter = field(default_factory=Counter)  # reason -> count of skipped samples
    examples: list[str] = field(default_factory=list)  # the first messages of skipped samples

    @property
    def bad_fraction(self) -> float:
        seen = self.read + self.skipped
        return self.skipped / seen if seen else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"expected": self.expected, "read": self.read, "skipped": self.skipped,
                "bad_fraction": self.bad_fraction, "reasons": dict(self.reasons), "examples": list(self.examples)}


class _BadSample(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# --------------------------------------------------------------------------------------------------------- writing


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid sample key (letters, digits, ``_``, ``-``; no dots), else raise ValueError."""
    if not isinstance(key, str) or not KEY_RE.match(key):
        raise ValueError(
            f"invalid sample key {key!r}: keys must be 1-96 characters of letters, digits, '_' or '-' "
            "(no dots: WebDataset splits member names at the first dot)"
        )
    return key


def encode_png(image: Image.Image) -> bytes:
    """Lossless PNG bytes of ``image`` (deterministic: no metadata chunks beyond what the mode needs)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(path: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    """Write a manifest (as returned by :func:`unirl.data.shard_writer.write_shards`, or several) atomically."""
    return atomic_write_json(path, manifest)


# --------------------------------------------------------------------------------------------------------- reading


def list_shards(root: str | os.PathLike, task: str, split: str | None = None) -> list[Path]:
    """Sorted shard files of ``task`` (one ``split``, or all splits when None) under ``root``."""
    task_dir = Path(root) / task
    if not task_dir.is_dir():
        raise FileNotFoundError(f"no shard directory {task_dir} for task {task!r}: run `unirl curate` first")
    shards = sorted(p for p in task_dir.iterdir() if (m := SHARD_RE.match(p.name)) and split in (None, m["split"]))
    if not shards:
        what = f"split {split!r} of task {task!r}" if split else f"task {task!r}"
        raise FileNotFoundError(f"no shards for {what} in {task_dir} (expected <split>-NNNNNN.tar): "
                                "run `unirl curate` first")
    return shards


def split_of(shard: str | os.PathLike) -> str:
    """The split named by a shard file name ``<split>-NNNNNN.tar``."""
    m = SHARD_RE.match(Path(shard).name)
    if not m:
        raise ValueError(f"{shard}: not a shard file name of the form <split>-NNNNNN.tar")
    return m["split"]


def split_member(name: str) -> tuple[str, str]:
    """``(key, extension)`` of a tar member name, split at the first dot of its base name (WebDataset rule)."""
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return name, ""
    key_part, ext = base.split(".", 1)
    prefix = name[: len(name) - len(base)]
    return prefix + key_part, ext


def open_checked_tar(path: Path) -> tuple[tarfile.TarFile, list[list[tarfile.TarInfo]]]:
    """Open a tar, check its structure and group its file members by key (in archive order)."""
    try:
        tf = tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{path}: not a readable tar file ({e}); the shard is corrupt, re-run `unirl curate`") from e
    try:
        try:
            members = tf.getmembers()
        except (tarfile.TarError, OSError) as e:
            last = split_member(tf.members[-1].name)[0] if tf.members else None
            raise ShardError(f"{path}: corrupt or truncated tar after sample {last!r} ({e}); re-run `unirl curate`") \
                from e
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(tf.offset)
            end_block = f.read(tarfile.BLOCKSIZE)
        overrun = [m for m in members if m.offset_data + m.size > size]
        if overrun or len(end_block) < tarfile.BLOCKSIZE or any(end_block):
            bad = overrun[0] if overrun else (members[-1] if members else None)
            key = split_member(bad.name)[0] if bad else None
            raise ShardError(
                f"{path}: truncated or corrupt tar (no end-of-archive block after {len(members)} members; "
                f"last sample key {key!r}); re-run `unirl curate`"
            )
        groups: list[list[tarfile.TarInfo]] = []
        for m in members:
            if not m.isfile():
                continue
            if groups and split_member(groups[-1][0].name)[0] == split_member(m.name)[0]:
                groups[-1].append(m)
            else:
                groups.append([m])
    except BaseException:
        tf.close()
        raise
    return tf, groups


def read_member(tf: tarfile.TarFile, m: tarfile.TarInfo, path: Path, key: str) -> bytes:
    """The data of member ``m``; a read failure is a :class:`ShardError` naming the shard and the key."""
    try:
        f = tf.extractfile(m)
        assert f is not None
        return f.read()
    except (tarfile.TarError, OSError) as e:
        raise ShardError(f"{path}: sample {key!r}: cannot read member {m.name!r} ({e}); re-run `unirl curate`") from e


def _parse_meta(raw: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _BadSample("invalid_json", f"invalid JSON metadata ({e})") from e
    if not isinstance(meta, dict):
        raise _BadSample("invalid_json", f"JSON metadata must be an object, got {type(meta).__name__}")
    return meta


def _as_size(resolution: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if resolution is None:
        return None
    if isinstance(resolution, int):
        return (resolution, resolution)
    return (int(resolution[0]), int(resolution[1]))


class ShardReader:
    """Iterate the samples of a shard set with checks; ``stats`` describes the last (or running) pass.

    ``source`` is a task directory (its shards of ``split``, or all splits when ``split`` is None), a shard file
    or a list of them. ``task`` (default: the directory name) is checked against each sample's ``meta["task"]`` and
    selects the required image extensions (:data:`REQUIRED_IMAGES`, or ``required_images``). ``resolution``
    (side, or (width, height)) is checked for every image. With ``decode=False`` images stay PNG bytes and
    only their headers are checked.
    """

    def __init__(
        self,
        source: str | os.PathLike | Sequence[str | os.PathLike],
        split: str | None = None,
        *,
        task: str | None = None,
        resolution: int | tuple[int, int] | None = None,
        required_images: Sequence[str] | None = None,
        max_bad_fraction: float = 0.0,
        decode: bool = True,
        max_examples: int = 20,
    ) -> None:
        if not 0.0 <= max_bad_fraction < 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1), got {max_bad_fraction}")
        if isinstance(source, str | os.PathLike) and Path(source).is_dir():
            d = Path(source)
            self.shards = list_shards(d.parent, d.name, split)
            task = task or d.name
        else:
            self.shards = [Path(p) for p in ([source] if isinstance(source, str | os.PathLike) else source)]
            missing = [p for p in self.shards if not p.is_file()]
            if missing:
                raise FileNotFoundError(f"shard file(s) {missing[:3]} do not exist: run `unirl curate` first")
            if split is not None:
                self.shards = [p for p in self.shards if split_of(p) == split]
            if not self.shards:
                raise FileNotFoundError(f"no shard files given (split {split!r}): run `unirl curate` first")
        self.task = task
        self.size = _as_size(resolution)
        self.required = tuple(required_images) if required_images is not None else REQUIRED_IMAGES.get(task or "", ())
        self.max_bad_fraction = max_bad_fraction
        self.decode = decode
        self.max_examples = max_examples
        self.stats = ReadStats()

    def count(self) -> int:
        """Number of samples (distinct keys) in the shards, from the tar headers; checks every shard's structure."""
        total = 0
        for p in self.shards:
            tf, groups = open_checked_tar(p)
            tf.close()
            total += len(groups)
        return total

    def __iter__(self) -> Iterator[ShardSample]:
        self.stats = stats = ReadStats(expected=self.count())
        seen: set[str] = set()
        for path in self.shards:
            tf, groups = open_checked_tar(path)
            with tf:
                for group in groups:
                    key = split_member(group[0].name)[0]
                    try:
                        sample = self._sample(tf, path, key, group, seen)
                    except _BadSample as e:
                        self._skip(path, key, e)
                        continue
                    stats.read += 1
                    yield sample
        self._check_fraction(final=True)

    def _sample(self, tf: tarfile.TarFile, path: Path, key: str, group: list[tarfile.TarInfo], seen: set[str]):
        if key in seen:
            raise _BadSample("duplicate_key", "key appears more than once in the shard set")
        seen.add(key)
        parts: dict[str, tarfile.TarInfo] = {}
        for m in group:
            ext = split_member(m.name)[1]
            if ext in parts:
                raise _BadSample("duplicate_member", f"member {m.name!r} appears twice")
            parts[ext] = m
        if "json" not in parts:
            raise _BadSample("missing_json", f"no 'json' member (has {sorted(parts)})")
        meta = _parse_meta(read_member(tf, parts["json"], path, key))
        task = meta.get("task", self.task)
        if self.task is not None and task != self.task:
            raise _BadSample("task_mismatch", f"meta task {task!r} != expected task {self.task!r}")
        missing = [e for e in self.required if e not in parts]
        if missing:
            raise _BadSample("missing_image", f"missing required image member(s) {missing} (has {sorted(parts)})")
        images: dict[str, Any] = {}
        extras: dict[str, bytes] = {}
        for ext, m in parts.items():
            if ext == "json":
                continue
            data = read_member(tf, m, path, key)
            if ext.rsplit(".", 1)[-1].lower() not in IMAGE_EXTS:
                extras[ext] = data
                continue
            try:
                img = Image.open(io.BytesIO(data))
                if self.decode:
                    img.load()
            except Exception as e:  # noqa: BLE001 - PIL raises many types for broken data
                raise _BadSample("undecodable_image", f"image {ext!r} does not decode ({e})") from e
            if self.size is not None and img.size != self.size:
                raise _BadSample("wrong_size", f"image {ext!r} is {img.size[0]}x{img.size[1]}, expected "
                                               f"{self.size[0]}x{self.size[1]}")
            images[ext] = img if self.decode else data
        return ShardSample(key=key, task=str(task), images=images, meta=meta, shard=str(path), extras=extras)

    def _skip(self, path: Path, key: str, err: _BadSample) -> None:
        msg = f"{path}: sample {key!r}: {err}"
        if self.max_bad_fraction <= 0.0:
            raise ShardError(f"{msg}; fix the data or re-run `unirl curate` (or allow a max_bad_fraction)")
        s = self.stats
        s.skipped += 1
        s.reasons[err.reason] += 1
        if len(s.examples) < self.max_examples:
            s.examples.append(msg)
        log.warning("skipping bad sample (%d so far): %s", s.skipped, msg)
        self._check_fraction(final=False)

    def _check_fraction(self, final: bool) -> None:
        s = self.stats
        if final:
            bad, total = s.skipped, s.read + s.skipped
        else:  # early: the bad count alone already exceeds the allowed share of the whole set
            bad, total = s.skipped, s.expected
        if total and bad / total > self.max_bad_fraction:
            raise ShardError(
                f"{bad} of {total} samples are bad ({bad / total:.2%} > max_bad_fraction {self.max_bad_fraction:.2%})"
                f" in {len(self.shards)} shard(s) starting at {self.shards[0]}; reasons {dict(s.reasons)}; "
                f"first: {s.examples[:3]}"
            )
        if final and s.skipped:
            log.warning("read %d samples, skipped %d bad (%s)", s.read, s.skipped, dict(s.reasons))


def read_samples(
    task_dir_or_shards: str | os.PathLike | Sequence[str | os.PathLike],
    split: str | None = None,
    *,
    max_bad_fraction: float = 0.0,
    decode: bool = True,
    task: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    required_images: Sequence[str] | None = None,
) -> ShardReader:
    """A :class:`ShardReader` over a task directory or shard list; iterate it for samples, then read ``.stats``."""
    return ShardReader(task_dir_or_shards, split, task=task, resolution=resolution, required_images=required_images,
                       max_bad_fraction=max_bad_fraction, decode=decode)
