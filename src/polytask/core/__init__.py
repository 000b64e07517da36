"""Bottom layer: tasks, registries, errors."""

from polytask.core.errors import (
    ConfigError,
    DataError,
    InvalidParameterError,
    MissingDependencyError,
    PolytaskError,
    ShapeError,
)
from polytask.core.registry import Registry
from polytask.core.task import KINDS, Task, task_names

__all__ = [
    "KINDS",
    "ConfigError",
    "DataError",
    "InvalidParameterError",
    "MissingDependencyError",
    "PolytaskError",
    "Registry",
    "ShapeError",
    "Task",
    "task_names",
]
