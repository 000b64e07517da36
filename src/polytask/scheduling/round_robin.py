"""Round robin: the tasks in turn, k per step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from polytask.scheduling.base import TASK_SCHEDULERS, TaskScheduler, check_param, is_count


@TASK_SCHEDULERS.register("round_robin")
class RoundRobin(TaskScheduler):
    """Step s trains the next k tasks in the cyclic task order, skipping tasks without data in the step.

    Alternating training (e.g. Collobert & Weston, ICML 2008: "select the next task"): every task is
    trained every ⌈T/k⌉ steps when all have data. The position in the cycle is the scheduler's
    state (``state_dict``), so a resumed run continues where it stopped.
    """

    def __init__(self, *, k: int = 1) -> None:
        check_param(is_count(k), "k", "round_robin", "an int >= 1", k)
        self.k = k
        self.position = 0

    def select(self, step: int, available: Sequence[str], generator: torch.Generator) -> list[str]:
        wanted = set(available)
        chosen: list[str] = []
        n = len(self.tasks)
        for offset in range(n):
            index = (self.position + offset) % n
            if self.tasks[index] in wanted:
                chosen.append(self.tasks[index])
                if len(chosen) == self.k:
                    break
        if chosen:
            self.position = (self.tasks.index(chosen[-1]) + 1) % n
        return [t for t in available if t in chosen]

    def state_dict(self) -> dict:
        return {"position": int(self.position)}

    def load_state_dict(self, state: Mapping) -> None:
        position = state.get("position", 0)
        valid = not isinstance(position, bool) and isinstance(position, int) and 0 <= position < max(len(self.tasks), 1)
        check_param(valid, "position", "round_robin", f"an int in [0, {len(self.tasks)}) in its state", position)
        self.position = position

    def __repr__(self) -> str:
        return f"RoundRobin(k={self.k})"
