"""Atomic file writes: the content goes to a temporary file in the target's own directory, then ``os.replace``
swaps it in, so a reader (DVC, Dagster, a resumed run) sees the old file or the new one, never half of one; a
failed write leaves the target as it was and removes its temporary file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["atomic_write_json", "atomic_write_text"]


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating its parent folders; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A per-process name (concurrent writers never share a temporary file) opened the ordinary way, so the file gets
    # the usual permissions (umask), not mkstemp's owner-only 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, sort_keys: bool = True) -> Path:
    """Write ``obj`` as indented JSON (non-JSON values through ``str``) to ``path`` atomically.

    ``sort_keys=False`` keeps insertion order (tables whose rows follow the params' order).
    """
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=str) + "\n")
