"""Training checkpoints: safetensors for every tensor, JSON for structure, atomic directories, exact resume.

Layout of one checkpoint, ``<run_dir>/step-XXXXXX/``::

    model.safetensors          full model state dict (name -> tensor); tied weights stored once (aliases in JSON)
    trainer_state.safetensors  every tensor leaf of the optimiser/engine state and the RNG states, flattened
    checkpoint.json            step, the nested structure of engine/RNG state with tensors replaced by
                               {"__tensor__": key}, scalars inline, ``extra`` (caller's JSON), sha256 of each file

Nothing is pickled. A checkpoint is written to ``step-XXXXXX.tmp`` and renamed into place once complete, so a
process killed while writing leaves only a ``.tmp`` directory, which :func:`latest_checkpoint` ignores and the
next save removes. ``keep_last`` prunes older checkpoints after a save.

RNG states (torch CPU and CUDA generators, NumPy's legacy global generator, Python's ``random``) are stored per
rank, so a resumed run draws the same noise as an uninterrupted one.

Engine independence: :func:`save_training_checkpoint` asks the engine for the *full* state. Under DeepSpeed
ZeRO-1/2 the module holds full weights on every rank; the fp32 master weights and AdamW moments are assembled
per parameter from the rank partitions with DeepSpeed's tensor-fragment API (a collective, so every rank
calls it). ZeRO-3 additionally partitions the module's own weights: the engine gathers them inside
``deepspeed.zero.GatheredParameters`` (all ranks), which needs the full model to fit in one process's memory
at save time; for models beyond that, DeepSpeed's own sharded ``save_checkpoint`` + ``zero_to_fp32`` would be
the route. A checkpoint written by either backend resumes under the other.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

if TYPE_CHECKING:  # pragma: no cover
    from unirl.train.engine import Engine

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "capture_rng_state",
    "check_key_sets",
    "inputs_digest",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "restore_rng_state",
    "resume_training",
    "save_checkpoint",
    "save_training_checkpoint",
]

FORMAT = "unirl-checkpoint"
VERSION = 1
INDEX = "checkpoint.json"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.safetensors"
_STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the model; the message says what to do."""


@dataclass
class Checkpoint:
    """A loaded checkpoint (all tensors on CPU)."""

    path: Path
    step: int
    model_state: dict[str, torch.Tensor]
    engine_state: dict[str, Any] | None
    rng_state: dict[str, Any] | None
    extra: dict[str, Any]

    @property
    def stage_state(self) -> dict[str, Any]:
        """The ``stage_state`` given to :func:`save_training_checkpoint` (``{}`` when none was)."""
        return (self.engine_state or {}).get("stage") or {}


def check_key_sets(expected: Iterable[str], got: Iterable[str], what: str, path: Path | str | None = None) -> None:
    """Raise :class:`CheckpointError` naming the missing/unexpected keys when two key sets differ."""
    expected, got = set(expected), set(got)
    if expected == got:
        return
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    where = f" in {path}" if path is not None else ""
    raise CheckpointError(
        f"{what}{where} does not match: {len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected "
        f"key(s) {unexpected[:5]}; resume with the model config and param groups the checkpoint was written with "
        "(its checkpoint.json 'extra' holds the run's config)"
    )


# --- nested state <-> (JSON structure, flat tensors) ---
def _flatten(tree: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, torch.Tensor):
        key = prefix
        while key in tensors:
            key += "_"
        tensors[key] = tree.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise TypeError(f"state keys must be strings at {prefix!r}")
        return {k: _flatten(v, f"{prefix}/{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [_flatten(v, f"{prefix}/{i}", tensors) for i, v in enumerate(tree)]
    if tree is None or isinstance(tree, bool | int | float | str):
        return tree
    if isinstance(tree, np.generic):
        return tree.item()
    raise TypeError(f"cannot store {type(tree).__name__} at {prefix!r} in a checkpoint: use tensors, numbers, str")


def _unflatten(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if set(tree) == {"__tensor__"}:
            return tensors[tree["__tensor__"]]
        return {k: _unflatten(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_unflatten(v, tensors) for v in tree]
    return tree


def _dedupe_model_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Store tied tensors once (name -> canonical name aliases); copy any other storage-sharing view."""
    canon: dict[tuple, str] = {}
    ptrs: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for k, v in state.items():
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else 0
        ident = (ptr, v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype, str(v.device))
        if v.numel() and ident in canon:
            aliases[k] = canon[ident]
            continue
        canon[ident] = k
        t = v.to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in ptrs:
            t = t.clone()
        ptrs.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out, aliases


# --- RNG ---
def capture_rng_state() -> dict[str, Any]:
    """This process's torch (CPU + CUDA), NumPy global and Python ``random`` states, as tensors and scalars."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": {
            "algorithm": str(np_state[0]),
            "keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),  # (624,)
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(state["torch"].to(torch.uint8))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([t.to(torch.uint8) for t in state["cuda"]])
    n = state["numpy"]
    np.random.set_state(
        (n["algorithm"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# --- directories ---
def _step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``run_dir`` (``step-XXXXXX`` with a ``checkpoint.json``), oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in run_dir.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / INDEX).exists()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint under ``run_dir``, or ``None`` (interrupted ``.tmp`` writes are ignored)."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def inputs_digest(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the files under ``paths`` (files or directories): relative names and contents, sorted.

    Part of a stage's default run directory, so that new input data (shards, tokenizer, autoencoder, initial model)
    starts a fresh run instead of resuming checkpoints trained on the old data. A missing path counts as
    ``missing`` (the stage itself reports it).
    """
    h = hashlib.sha256()
    for i, root in enumerate(map(Path, paths)):
        files = [(root.name, root)] if root.is_file() else []
        if root.is_dir():
            files = sorted((str(p.relative_to(root)), p) for p in root.rglob("*") if p.is_file())
        h.update(f"input {i}: {len(files) or 'missing'}\n".encode())
        for name, f in files:
            h.update(f"{name}\n{_sha256(f)}\n".encode())
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    engine_state: dict[str, Any] | None = None,
    rng_state: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
) -> Path:
    """Write ``<run_dir>/step-XXXXXX`` atomically and return its path (single writer: rank 0 only).

    Args:
        model_state: name -> tensor (any device; tied tensors are stored once).
        engine_state: nested dict/list of tensors and JSON scalars (e.g. ``Engine.state_dict_for_checkpoint()``).
        rng_state: nested state as from :func:`capture_rng_state` (or one per rank).
        extra: JSON-serialisable metadata (config, data position, ...), returned as ``Checkpoint.extra``.
        keep_last: keep only this many newest checkpoints (``None``/0 keeps all).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    extra = dict(extra or {})
    try:
        json.dumps(extra)
    except TypeError as e:
        raise TypeError(f"checkpoint 'extra' must be JSON-serialisable: {e}") from e
    for stale in run_dir.glob("step-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    final = _step_dir(run_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    tmp.mkdir()

    model_tensors, aliases = _dedupe_model_state(model_state)
    state_tensors: dict[str, torch.Tensor] = {}
    engine_tree = _flatten(engine_state, "engine", state_tensors) if engine_state is not None else None
    rng_tree = _flatten(rng_state, "rng", state_tensors) if rng_state is not None else None
    save_file(model_tensors, str(tmp / MODEL_FILE), metadata={"format": FORMAT, "step": str(step)})
    save_file(state_tensors, str(tmp / STATE_FILE), metadata={"format": FORMAT, "step": str(step)})
    index = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(step),
        "files": {
            name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size}
            for name in (MODEL_FILE, STATE_FILE)
        },
        "model_aliases": aliases,
        "engine": engine_tree,
        "rng": rng_tree,
        "extra": extra,
    }
    (tmp / INDEX).write_text(json.dumps(index, indent=1))
    for name in (MODEL_FILE, STATE_FILE, INDEX):
        _fsync(tmp / name)
    if final.exists():  # re-saving a step (e.g. after a resume): replace the old directory
        old = final.with_name(final.name + ".old")
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    _fsync(run_dir)
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _resolve(path: Path) -> Path:
    if not path.exists():
        raise CheckpointError(
            f"no checkpoint at {path}: pass a step-XXXXXX directory written by save_checkpoint or the run "
            "directory holding them (or start without resuming)"
        )
    if (path / INDEX).exists():
        return path
    if path.name.endswith(".tmp"):
        raise CheckpointError(
            f"{path} is an incomplete checkpoint (writing was interrupted): "
            f"resume from latest_checkpoint({path.parent}) instead"
        )
    latest = latest_checkpoint(path)
    if latest is None:
        raise CheckpointError(
            f"{path} holds no complete checkpoint (no step-XXXXXX/{INDEX}): "
            "check the run directory, or start without resuming"
        )
    return latest


def load_checkpoint(path: str | os.PathLike, verify: bool = True) -> Checkpoint:
    """Read a checkpoint directory (or the newest one under a run directory) onto the CPU.

    ``verify`` checks each file's sha256 against ``checkpoint.json``. Raises :class:`CheckpointError` for a
    missing, incomplete or corrupt checkpoint, naming the file and what to do.
    """
    path = _resolve(Path(path))
    advice = f"delete {path} so that the previous checkpoint is used, or pass an older step directory"
    try:
        index = json.loads((path / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / INDEX} is unreadable ({e}): {advice}") from e
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise CheckpointError(f"{path / INDEX} is not a {FORMAT} v{VERSION} index: {advice}")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for name in (MODEL_FILE, STATE_FILE):
        if not (path / name).exists():
            raise CheckpointError(f"{path / name} is missing: {advice}")
    for name in (MODEL_FILE, STATE_FILE):
        f = path / name
        if verify and _sha256(f) != index["files"][name]["sha256"]:
            raise CheckpointError(
                f"{f} is corrupt (sha256 differs from {INDEX}; "
                f"{f.stat().st_size} bytes on disk, {index['files'][name]['bytes']} written): {advice}"
            )
        try:
            tensors[name] = load_file(str(f), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e}): {advice}") from e
    model_state = tensors[MODEL_FILE]
    for alias, canonical in index["model_aliases"].items():
        model_state[alias] = model_state[canonical]
    state = tensors[STATE_FILE]
    return Checkpoint(
        path=path,
        step=int(index["step"]),
        model_state=model_state,
        engine_state=_unflatten(index["engine"], state) if index["engine"] is not None else None,
        rng_state=_unflatten(index["rng"], state) if index["rng"] is not None else None,
        extra=index["extra"],
    )


# --- engine-level (collective) helpers ---
def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save_training_checkpoint(
    engine: Engine,
    run_dir: str | os.PathLike,
    step: int,
    extra: dict[str, Any] | None = None,
    keep_last: int | None = None,
    stage_state: dict[str, Any] | None = None,
) -> Path:
    """Save model + optimiser + every rank's RNG state. Collective: call on all ranks; rank 0 writes.

    ``stage_state``: the stage's own tensors beyond the engine's (e.g. a weight average), nested dict of tensors
    and JSON scalars, stored as ``engine_state["stage"]`` of the checkpoint (rank 0's).
    Returns the checkpoint path (on every rank, after all ranks passed a barrier).
    """
    model_state = engine.model_state_dict()
    engine_state = engine.state_dict_for_checkpoint()
    if stage_state is not None:
        engine_state["stage"] = stage_state
    rank, world = _world()
    rng = capture_rng_state()
    ranks = [rng]
    if world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, rng)  # in transit only; stored as tensors/JSON below
    path = _step_dir(Path(run_dir), step)
    if rank == 0:
        path = save_checkpoint(
            run_dir, step, model_state, engine_state, {"world_size": world, "ranks": ranks}, extra, keep_last
        )
    if world > 1:
        dist.barrier()
    return path


def resume_training(engine: Engine, path: str | os.PathLike) -> Checkpoint | None:
    """Load the checkpoint at ``path`` (a step directory, or the newest under a run directory) into ``engine``.

    Restores model weights, optimiser state, step counters and this rank's RNG state. Returns the
    :class:`Checkpoint` (its ``step`` and ``extra`` tell the loop where to continue), or ``None`` when ``path``
    is a run directory without any checkpoint yet (a fresh start). Collective: call on all ranks.
    """
    path = Path(path)
    if not (path / INDEX).exists() and latest_checkpoint(path) is None and not path.name.startswith("step-"):
        return None
    ckpt = load_checkpoint(path)
    engine.load_checkpoint_state(ckpt.engine_state, ckpt.model_state, source=ckpt.path)
    if ckpt.rng_state is not None:
        rank, world = _world()
        ranks = ckpt.rng_state.get("ranks", [ckpt.rng_state])
        if len(ranks) != world:
            print(
                f"[resume] {ckpt.path} was written by {len(ranks)} process(es), now {world}: "
                "ranks beyond the saved ones reuse rank 0's RNG state",
                flush=True,
            )
        restore_rng_state(ranks[rank] if rank < len(ranks) else ranks[0])
    return ckpt
