"""polytask: multi-task learning on PyTorch.

Every method yields task weights; tasks are named everywhere. See DESIGN in the repository.
"""

from polytask import data, datasets, engine, methods, metrics, models
from polytask.core import ConfigError, DataError, InvalidParameterError, PolytaskError, ShapeError, Task
from polytask.engine import Engine, backward
from polytask.metrics import delta_m
from polytask.models import encoders
from polytask.train import CheckpointError, NonFiniteLossError, Trainer

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DataError",
    "Engine",
    "InvalidParameterError",
    "NonFiniteLossError",
    "PolytaskError",
    "ShapeError",
    "Task",
    "Trainer",
    "backward",
    "data",
    "datasets",
    "delta_m",
    "encoders",
    "engine",
    "methods",
    "metrics",
    "models",
]
