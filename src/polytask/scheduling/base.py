"""Task schedulers: which of the available tasks get a gradient at a step."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.core.registry import Registry


class TaskScheduler:
    """Chooses the active tasks of a step among those with data in it.

    ``select`` sees the step index, the available task names and the trainer's seeded generator;
    ``observe`` receives each step's detached losses of the active tasks (for adaptive
    schedulers). State goes through ``state_dict`` so a resumed run chooses the same tasks.
    """

    def setup(self, tasks: Sequence[str]) -> None:
        self.tasks = tuple(tasks)

    def select(self, step: int, available: Sequence[str], generator: torch.Generator) -> list[str]:
        return list(available)

    def observe(self, step: int, losses: Mapping[str, float]) -> None:
        """Feedback after a step: loss per active task."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Stateless by default: nothing to restore."""


TASK_SCHEDULERS: Registry[TaskScheduler] = Registry("task scheduler")


@TASK_SCHEDULERS.register("all")
class AllTasks(TaskScheduler):
    """Every task with data in the step is trained (the default of every MTL library)."""


def check_param(ok: bool, key: str, scheduler: str, rule: str, value: Any) -> None:
    """Raise the one-voice error "`key` of `scheduler` task scheduler must be RULE; found VALUE"."""
    if not ok:
        raise InvalidParameterError(f"`{key}` of `{scheduler}` task scheduler must be {rule}; found {value!r}")


def is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def is_count(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= 1


def draw(probabilities: Tensor, k: int, generator: torch.Generator) -> list[int]:
    """Indices of ``min(k, len(p))`` distinct entries drawn with probabilities ∝ ``p``, in index order."""
    k = min(k, int((probabilities > 0).sum()))
    return sorted(torch.multinomial(probabilities, k, replacement=False, generator=generator).tolist())
