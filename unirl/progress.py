"""Progress bars for long work: tqdm, throttled when nobody watches a terminal.

On a TTY the bar redraws as usual. When stderr is a file or a pipe (``dvc repro`` logs, CI, Dagster's captured
output) tqdm would append a redraw every 0.1 s; there :func:`progress_bar` redraws at most every ``NON_TTY_INTERVAL``
seconds, so logs stay readable and still show where a stage is.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

NON_TTY_INTERVAL = 30.0

__all__ = ["NON_TTY_INTERVAL", "progress_bar"]


def progress_bar(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, with ``mininterval`` = ``NON_TTY_INTERVAL`` unless stderr is a terminal."""
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs.setdefault("mininterval", NON_TTY_INTERVAL)
    return tqdm(iterable, **kwargs)
