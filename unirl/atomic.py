"""Atomic file and directory writes: the content goes to a temporary file (or folder) beside the target, then
``os.replace`` swaps it in, so a reader (DVC, Dagster, a resumed run) sees the old version or the new one, never half
of one; a failed write leaves the target as it was and removes its temporary copy."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["atomic_output", "atomic_write_json", "atomic_write_text", "replace_dir", "staged_dir"]


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the temporary path to write ``path``'s content to; on a clean exit it replaces ``path``, on an error
    it is removed. Parent folders are created. Writers that infer a format from the suffix (PIL, matplotlib) must
    be given the format: the temporary name ends in ``.tmp``.

    The name is per process (concurrent writers never share it) and the caller opens it the ordinary way, so the
    file gets the usual permissions (umask), not ``mkstemp``'s owner-only 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its parent folders; returns the path."""
    with atomic_output(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values through ``str``) to ``path`` atomically.

    ``sort_keys=False`` keeps insertion order (tables whose rows follow the params' order).
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")


@contextlib.contextmanager
def staged_dir(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty sibling temp dir of ``out_dir``; on a clean exit it replaces ``out_dir`` (:func:`replace_dir`).

    On an exception ``out_dir`` is left as it was; the temp dir is removed either way.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)  # mkdtemp's 0700 would make the swapped-in folder owner-only (shard_writer does the same)
    try:
        yield tmp
        replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def replace_dir(src: Path, dst: Path) -> None:
    """Move directory ``src`` to ``dst``, replacing an existing ``dst`` (rename-aside, rename-in, delete-old)."""
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
