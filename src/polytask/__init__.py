"""polytask: multi-task learning on PyTorch.

Every method yields task weights; tasks are named everywhere. The design is in the repository's
``docs/`` (docs/README.md is the index).

The names below are imported on first use (PEP 562), so ``import polytask`` alone, and the
``polytask --help`` / ``--version`` that need nothing more, do not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_SUBMODULES = ("data", "datasets", "engine", "methods", "metrics", "models", "train")
_NAMES = {
    "CheckpointError": "polytask.train", "ConfigError": "polytask.core", "DataError": "polytask.core",
    "Engine": "polytask.engine", "InvalidParameterError": "polytask.core", "NonFiniteLossError": "polytask.train",
    "PolytaskError": "polytask.core", "ShapeError": "polytask.core", "Task": "polytask.core", "Trainer": "polytask.train",
    "backward": "polytask.engine", "delta_m": "polytask.metrics", "encoders": "polytask.models",
    "load": "polytask.runs", "export": "polytask.runs", "infer_num_classes": "polytask.core",
    "register_loss": "polytask.core", "register_metric": "polytask.metrics",
    "MultiOutputDataset": "polytask.data", "TaskDatasets": "polytask.data", "TorchData": "polytask.data",
}

if TYPE_CHECKING:
    from polytask import data, datasets, engine, methods, metrics, models, train
    from polytask.core import (
        ConfigError,
        DataError,
        InvalidParameterError,
        PolytaskError,
        ShapeError,
        Task,
        infer_num_classes,
        register_loss,
    )
    from polytask.data import MultiOutputDataset, TaskDatasets, TorchData
    from polytask.engine import Engine, backward
    from polytask.metrics import delta_m, register_metric
    from polytask.models import encoders
    from polytask.runs import export, load
    from polytask.train import CheckpointError, NonFiniteLossError, Trainer


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"polytask.{name}")
    if name in _NAMES:
        value = getattr(importlib.import_module(_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'polytask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SUBMODULES, *_NAMES})


__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Engine",
    "InvalidParameterError",
    "MultiOutputDataset",
    "NonFiniteLossError",
    "PolytaskError",
    "ShapeError",
    "Task",
    "TaskDatasets",
    "TorchData",
    "Trainer",
    "backward",
    "data",
    "datasets",
    "delta_m",
    "encoders",
    "engine",
    "export",
    "infer_num_classes",
    "load",
    "methods",
    "metrics",
    "models",
    "register_loss",
    "register_metric",
    "train",
]
