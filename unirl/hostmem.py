"""Keep freed host memory in the process, so that large CPU tensors do not pay page faults on every step.

glibc's ``malloc`` serves blocks above its mmap threshold (adaptive, 32 MiB at most) with a fresh ``mmap`` and
returns them to the kernel on ``free``; every allocation of that size then faults its pages in again, zero-filled,
one 4 KiB page at a time. A training step that allocates the same large activations each time pays this on every
step: the batched DM replay of the tiny profile's ``t2i`` GRPO step (160 transitions, CFG, tensors of tens of MB)
took ~590k minor page faults per pass, and the loss + backward of one step went 6.4 s -> 3.9-4.2 s with the
thresholds below (2 threads, this repository's 2-core test machine).

:func:`retain_freed_memory` raises the mmap threshold to 1 GiB and the trim threshold to 2 GiB (``mallopt``), so
freed blocks stay in the heap and are reused; this is what the jemalloc/tcmalloc setups recommended for PyTorch on
CPU achieve, without a preloaded allocator. The cost: the process keeps its peak heap instead of shrinking after it.
The ``unirl`` command calls it before running a stage (every training stage runs through it, also under DVC and
Dagster); ``UNIRL_RETAIN_FREED_MEMORY=0`` turns it off. On a libc without ``mallopt`` (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["ENV_VAR", "retain_freed_memory"]

ENV_VAR = "UNIRL_RETAIN_FREED_MEMORY"
# glibc <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap
_TRIM_THRESHOLD = (1 << 31) - 1  # keep up to ~2 GiB of free heap top instead of returning it to the kernel


def retain_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds for this process; True when both were set (see the module docstring)."""
    if os.environ.get(ENV_VAR, "1").strip().lower() in {"0", "false", "no", "off"}:
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on (no library search)
    except (OSError, AttributeError):  # no mallopt: nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
