"""Bottom layer: tasks, registries, errors."""

from polytask.core.errors import (
    ConfigError,
    DataError,
    InvalidParameterError,
    MissingDependencyError,
    PolytaskError,
    ShapeError,
)
from polytask.core.losses import LOSSES, TaskLoss, register_loss
from polytask.core.registry import Registry
from polytask.core.task import KINDS, Task, infer_num_classes, task_names

__all__ = [
    "KINDS",
    "LOSSES",
    "ConfigError",
    "DataError",
    "InvalidParameterError",
    "MissingDependencyError",
    "PolytaskError",
    "Registry",
    "ShapeError",
    "Task",
    "TaskLoss",
    "infer_num_classes",
    "register_loss",
    "task_names",
]
