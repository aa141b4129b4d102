"""Process-group setup shared by every training entry point.

One function, :func:`init_distributed`, makes the same script run

* as a single plain process (``python -m unirl.cli ...``): no environment needed; a 1-process ``gloo``/``nccl``
  group is created only when asked for (DeepSpeed always needs one), with ``RANK=0``, ``WORLD_SIZE=1``,
  ``MASTER_ADDR=127.0.0.1`` and a free ``MASTER_PORT`` filled in;
* under ``torchrun`` or the ``deepspeed`` launcher with several processes: both export ``RANK``,
  ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``, which ``env://`` initialisation reads.

On a machine without CUDA the backend is ``gloo`` and ``DS_ACCELERATOR=cpu`` is exported before DeepSpeed
is imported (DeepSpeed picks its accelerator at import time). With CUDA the backend is ``nccl`` and each
process binds ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from unirl.config import PROJECT_ROOT

__all__ = [
    "DistInfo",
    "barrier",
    "configure_deepspeed_env",
    "default_device",
    "dist_info",
    "init_distributed",
    "print_in_rank_order",
    "rank0_print",
    "shutdown_distributed",
]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    is_main: bool


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def configure_deepspeed_env() -> None:
    """Environment DeepSpeed reads at import: CPU accelerator without CUDA, op builds cached in the project.

    ``TORCH_EXTENSIONS_DIR`` points at ``<project>/.cache/torch_extensions`` (git-ignored) so any JIT-built op
    is built once per checkout, not once per ``/tmp``. Existing values are kept.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(PROJECT_ROOT / ".cache" / "torch_extensions"))


def default_backend() -> str:
    """``nccl`` with CUDA, else ``gloo``."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def default_device(info: DistInfo | None = None) -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is available, else CPU."""
    if torch.cuda.is_available():
        local_rank = info.local_rank if info is not None else int(os.environ.get("LOCAL_RANK", "0"))
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


# What torchrun and the deepspeed launcher export to each rank (and init_distributed fills in for a 1-process group).
LAUNCH_ENV: tuple[str, ...] = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_own_group_env: dict[str, str] = {}  # what init_distributed exported itself, for its own 1-process group


def under_launcher() -> bool:
    """Whether a launcher (torchrun, deepspeed) started this process, i.e. exported ``WORLD_SIZE``.

    The variables :func:`init_distributed` fills in for a 1-process group (an in-process DeepSpeed stage) do not
    count, so that a later stage of the same process (``unirl pipeline``) still relaunches itself when asked to.
    """
    own = bool(_own_group_env) and all(os.environ.get(k) == v for k, v in _own_group_env.items())  # still ours
    return "WORLD_SIZE" in os.environ and not own


def child_env() -> dict[str, str]:
    """``os.environ`` for a child process (a ``torchrun`` relaunch, a stage that Dagster launches), without the
    variables of this process's own 1-process group: a child that saw them would take itself for a launcher's rank
    and skip its relaunch. A launcher's variables pass through unchanged."""
    env = dict(os.environ)
    if _own_group_env and not under_launcher():
        for key in LAUNCH_ENV:
            env.pop(key, None)
    return env


def dist_info() -> DistInfo:
    """The current process's position: from the live process group, else from the launcher's environment."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, is_main=rank == 0)


def init_distributed(backend: str | None = None, require_group: bool = False) -> DistInfo:
    """Join (or create) the process group described by the launcher's environment.

    Args:
        backend: ``"gloo"``, ``"nccl"`` or ``None`` for :func:`default_backend`.
        require_group: create a 1-process group even when running alone (DeepSpeed needs one).

    Returns the :class:`DistInfo` of this process. Safe to call more than once.
    """
    if dist.is_initialized():
        return dist_info()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" not in os.environ:
        raise RuntimeError("WORLD_SIZE > 1 but RANK is not set: launch with torchrun or deepspeed, which export both")
    if world == 1 and not require_group:
        return dist_info()
    if world == 1:
        own = "WORLD_SIZE" not in os.environ
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        if own:  # remembered, so that under_launcher() can tell these from a launcher's
            _own_group_env.update({k: os.environ[k] for k in ("WORLD_SIZE", "MASTER_PORT")})
    backend = backend or default_backend()
    info = dist_info()
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, init_method="env://", rank=info.rank, world_size=world)
    return dist_info()


def barrier() -> None:
    """``dist.barrier()`` when a group exists, else nothing."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def print_in_rank_order(text: str) -> None:
    """Print ``text`` on every rank, rank 0 first, each rank's output flushed before the next rank writes.

    Ranks under one launcher share its stdout; lines they print at the same moment (after a collective) can be cut
    into each other when a buffer flushes mid-line. Without a group of several processes it is a plain ``print``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        print(text, flush=True)
        return
    for rank in range(dist.get_world_size()):
        if rank == dist.get_rank():
            print(text, flush=True)
        dist.barrier()


def shutdown_distributed() -> None:
    """Leave a launcher's process group cleanly: a barrier (every rank is past its last collective), then
    ``destroy_process_group``.

    Call it at the end of a rank's successful run. A rank that exits with its ``gloo`` group (and DeepSpeed's
    shared-memory communicator) still alive can abort in interpreter teardown ("terminate called without an active
    exception", SIGABRT) after its work is done, and torchrun then reports the whole job failed. The 1-process
    group :func:`init_distributed` creates for an in-process stage is left alone (later stages of the same process
    reuse it); without a group this does nothing.
    """
    if not (dist.is_available() and dist.is_initialized()) or not under_launcher():
        return
    barrier()
    dist.destroy_process_group()


def rank0_print(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (flushes, so launcher logs interleave sensibly)."""
    if dist_info().is_main:
        kwargs.setdefault("flush", True)
        print(*args, **kwargs)
