"""Trainer, checkpoints, run directories and gradient health."""

from polytask.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from polytask.train.health import GradientHealthError, GradientHealthWarning, HealthSettings, NonFiniteLossError
from polytask.train.rundir import RunDir
from polytask.train.trainer import Report, Trainer

__all__ = [
    "CheckpointError",
    "GradientHealthError",
    "GradientHealthWarning",
    "HealthSettings",
    "NonFiniteLossError",
    "Report",
    "RunDir",
    "Trainer",
    "load_checkpoint",
    "save_checkpoint",
]
