"""Callbacks: what runs around the training loop (see ``base`` for the contract)."""

from polytask.train.callbacks.base import CALLBACKS, Callback, TrainStep
from polytask.train.callbacks.builtin import Checkpointing, ConsoleLogger, CSVLogger, EarlyStopping, Plots
from polytask.train.callbacks.diagnostics import Diagnostics
from polytask.train.callbacks.mlflow import MLflowLogger
from polytask.train.callbacks.tensorboard import TensorBoardLogger

__all__ = ["CALLBACKS", "CSVLogger", "Callback", "Checkpointing", "ConsoleLogger", "Diagnostics", "EarlyStopping", "MLflowLogger", "Plots",
           "TensorBoardLogger", "TrainStep"]
