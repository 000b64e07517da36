"""Encoder registry. An encoder maps an input batch to a (batch, out_features) representation."""

from __future__ import annotations

from torch import nn

from polytask.core.registry import Registry
from polytask.models.spec import RecordingRegistry

ENCODERS: Registry[nn.Module] = RecordingRegistry("encoder")
