"""Training: the engine (plain torch or DeepSpeed), checkpoints and resume, process-group setup.

Stage loops (``sft``, the RL scenarios) build an :class:`~unirl.train.engine.Engine` with
:func:`~unirl.train.engine.build_engine` and save/resume with :mod:`unirl.train.checkpoint`.
"""

from unirl.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    latest_checkpoint,
    load_checkpoint,
    resume_training,
    save_checkpoint,
    save_training_checkpoint,
)
from unirl.train.distributed import DistInfo, init_distributed, rank0_print, shutdown_distributed
from unirl.train.engine import Engine, EngineConfig, build_engine

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DistInfo",
    "Engine",
    "EngineConfig",
    "build_engine",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "rank0_print",
    "resume_training",
    "save_checkpoint",
    "save_training_checkpoint",
    "shutdown_distributed",
]
