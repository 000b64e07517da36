"""Trainer, checkpoints and run directories."""

from polytask.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from polytask.train.rundir import RunDir
from polytask.train.trainer import NonFiniteLossError, Report, Trainer

__all__ = ["CheckpointError", "NonFiniteLossError", "Report", "RunDir", "Trainer", "load_checkpoint",
           "save_checkpoint"]
