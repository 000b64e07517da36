"""Which tasks a training step trains."""

import importlib
import pkgutil

from polytask.scheduling.base import TASK_SCHEDULERS, TaskScheduler

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["TASK_SCHEDULERS", "TaskScheduler"]
