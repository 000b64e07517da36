"""Trainer, checkpoints, run directories and gradient health."""

from polytask.train.callbacks import CALLBACKS, Callback, TrainStep
from polytask.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from polytask.train.health import GradientHealthError, GradientHealthWarning, HealthOptions, NonFiniteLossError
from polytask.train.options import ClipOptions, LoopOptions, OptimOptions, RunOptions
from polytask.train.rundir import RunDir
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
