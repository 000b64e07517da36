"""Callbacks: what runs around the training loop (see ``base`` for the contract)."""

from polytask.train.callbacks.base import CALLBACKS, Callback, TrainStep
from polytask.train.callbacks.builtin import Checkpointing, ConsoleLogger, CSVLogger, EarlyStopping, Plots

__all__ = ["CALLBACKS", "CSVLogger", "Callback", "Checkpointing", "ConsoleLogger", "EarlyStopping", "Plots",
           "TrainStep"]
