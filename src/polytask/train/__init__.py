"""Trainer, checkpoints, run directories and gradient health.

``Trainer`` and ``Report`` are imported on first use (PEP 562): the trainer imports torchmetrics,
which takes seconds, and the callbacks' registry, checkpoints and options do not need it.
"""

from typing import TYPE_CHECKING, Any

from polytask.train.callbacks import CALLBACKS, Callback, TrainStep
from polytask.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from polytask.train.health import GradientHealthError, GradientHealthWarning, HealthOptions, NonFiniteLossError
from polytask.train.options import ClipOptions, LoopOptions, OptimOptions, RunOptions
from polytask.train.rundir import RunDir

if TYPE_CHECKING:
    from polytask.train.trainer import Report, Trainer

__all__ = [
    "CALLBACKS",
    "Callback",
    "ClipOptions",
    "LoopOptions",
    "OptimOptions",
    "RunOptions",
    "TrainStep",
    "CheckpointError",
    "GradientHealthError",
    "GradientHealthWarning",
    "HealthOptions",
    "NonFiniteLossError",
    "Report",
    "RunDir",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
]


def __getattr__(name: str) -> Any:
    if name in ("Report", "Trainer"):
        from polytask.train import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
