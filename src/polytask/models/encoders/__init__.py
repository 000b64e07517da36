"""Encoders: map an input batch to a (batch, out_features) shared representation."""

from polytask.models.encoders.base import ENCODERS
from polytask.models.encoders.cnn import CNN
from polytask.models.encoders.mlp import MLP
from polytask.models.encoders.tabular import Tabular
from polytask.models.encoders.text import Text

__all__ = ["CNN", "ENCODERS", "MLP", "Tabular", "Text"]
