"""Shard writing: ``(key, split, sample)`` triples -> WebDataset tars ``<out_dir>/<task>/<split>-%06d.tar``.

Writing goes through ``webdataset.ShardWriter`` (one writer per split) with a fixed member mtime (0), owner and
mode, so the same samples in the same order give byte-identical tars. A task's shard set is written into a
temporary directory next to the target and swapped in with renames: a crash never leaves a half-written set.
The layout and the checked reader are in :mod:`unirl.data.shards`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image

from unirl.atomic import replace_dir
from unirl.data.shards import FIXED_MTIME, SPLIT_RE, SampleLike, encode_png, sha256_file, validate_key

__all__ = ["write_shards"]


def _encode_sample(key: str, sample: SampleLike) -> dict[str, Any]:
    images = sample.images or {}
    meta = dict(sample.meta)
    meta.setdefault("task", sample.task)
    obj: dict[str, Any] = {"__key__": key, "json": json.dumps(meta, sort_keys=True, ensure_ascii=False).encode()}
    for ext, img in images.items():
        if ext != "png" and not ext.endswith(".png"):
            raise ValueError(f"sample {key!r}: image extension {ext!r} must be 'png' or end in '.png' (stored as PNG)")
        if not isinstance(img, Image.Image):
            raise ValueError(f"sample {key!r}: images[{ext!r}] is a {type(img).__name__}, expected a PIL image")
        obj[ext] = encode_png(img)
    return obj


def write_shards(
    samples: Iterable[tuple[str, str, SampleLike]],
    out_dir: str | os.PathLike,
    task: str,
    maxcount: int = 10_000,
    maxsize: float = 1e9,
) -> dict[str, Any]:
    """Write ``(key, split, sample)`` triples as ``<out_dir>/<task>/<split>-%06d.tar`` and return the manifest.

    The task directory is replaced atomically (existing shards of the task are removed only once the new set is
    complete). Keys must be valid (:func:`validate_key`) and unique within the task. The manifest holds the
    counts per split, tag and split x tag, the image extensions used, and every shard with its sample count,
    size and sha256 (paths relative to ``out_dir``).
    """
    if not SPLIT_RE.match(task):
        raise ValueError(f"invalid task name {task!r}: use lowercase letters, digits and '_'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{task}.tmp-"))
    writers: dict[str, wds.ShardWriter] = {}
    per_shard: Counter = Counter()
    split_of_shard: dict[str, str] = {}
    seen: set[str] = set()
    splits: Counter = Counter()
    tags: Counter = Counter()
    split_tags: dict[str, Counter] = {}
    image_keys: set[str] = set()
    try:
        for key, split, sample in samples:
            validate_key(key)
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r} in task {task!r}: keys must be unique within a task")
            seen.add(key)
            if not isinstance(split, str) or not SPLIT_RE.match(split):
                raise ValueError(f"sample {key!r}: invalid split name {split!r} (use e.g. train/val/test)")
            obj = _encode_sample(key, sample)
            if split not in writers:
                pattern = str(tmp).replace("%", "%%") + f"/{split}-%06d.tar"
                writers[split] = wds.ShardWriter(pattern, maxcount=maxcount, maxsize=maxsize, verbose=0,
                                                 mtime=FIXED_MTIME)
            writer = writers[split]
            writer.write(obj)
            name = Path(writer.fname).name
            per_shard[name] += 1
            split_of_shard[name] = split
            tag = str(sample.meta.get("tag"))
            splits[split] += 1
            tags[tag] += 1
            split_tags.setdefault(split, Counter())[tag] += 1
            image_keys.update((sample.images or {}).keys())
        for w in writers.values():
            w.close()
        writers.clear()
        shards = [
            {"file": f"{task}/{name}", "split": split_of_shard[name], "n_samples": per_shard[name],
             "bytes": (tmp / name).stat().st_size, "sha256": sha256_file(tmp / name)}
            for name in sorted(per_shard)
        ]
        os.chmod(tmp, 0o755)
        replace_dir(tmp, out_dir / task)
    except BaseException:
        for w in writers.values():
            try:
                w.close()
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "task": task,
        "n_samples": sum(splits.values()),
        "splits": dict(sorted(splits.items())),
        "tags": dict(sorted(tags.items())),
        "split_tags": {s: dict(sorted(c.items())) for s, c in sorted(split_tags.items())},
        "image_keys": sorted(image_keys),
        "shards": shards,
    }
