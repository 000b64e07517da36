"""Loss-driven prioritiser: tasks that have made the least relative progress are trained more often."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from polytask.scheduling.base import TASK_SCHEDULERS, TaskScheduler, check_param, draw, is_count, is_number


@TASK_SCHEDULERS.register("loss_priority")
class LossPriority(TaskScheduler):
    """pᵢ ∝ (L̄ᵢ / Lᵢ⁽⁰⁾)^β, mixed with uniform: p = (1 − ε)·p + ε/K; k tasks drawn from p.

    L̄ᵢ is an exponential moving average of task i's observed loss (``smoothing``), Lᵢ⁽⁰⁾ its first
    observed loss: the ratio is GradNorm's inverse training rate (Chen et al., ICML 2018),
    used here to choose tasks rather than to weight them, in the spirit of dynamic task
    prioritisation (Guo et al., ECCV 2018): tasks that learn slowly (ratio near 1 or above) are
    picked more often, tasks whose loss fell far are picked less. β = 0 is uniform; larger β
    focuses harder. Tasks not yet observed get the largest priority so each is measured early.
    ε = ``exploration`` keeps every task's probability ≥ ε/K. State (initial and smoothed losses)
    is in ``state_dict``.
    """

    def __init__(self, *, k: int = 1, beta: float = 1.0, smoothing: float = 0.9, exploration: float = 0.05) -> None:
        check_param(is_count(k), "k", "loss_priority", "an int >= 1", k)
        check_param(is_number(beta) and beta >= 0, "beta", "loss_priority", ">= 0", beta)
        check_param(is_number(smoothing) and 0 <= smoothing < 1, "smoothing", "loss_priority", "in [0, 1)", smoothing)
        check_param(is_number(exploration) and 0 <= exploration <= 1, "exploration", "loss_priority", "in [0, 1]",
                    exploration)
        self.k, self.beta, self.smoothing, self.exploration = k, float(beta), float(smoothing), float(exploration)

    def setup(self, tasks: Sequence[str]) -> None:
        super().setup(tasks)
        self.initial: dict[str, float] = {}
        self.recent: dict[str, float] = {}

    def priorities(self, available: Sequence[str]) -> dict[str, float]:
        """(L̄ᵢ / Lᵢ⁽⁰⁾)^β per available task (unobserved tasks: the largest observed priority, or 1)."""
        known = {t: (self.recent[t] / self.initial[t]) ** self.beta for t in available
                 if t in self.initial and self.initial[t] > 0}
        top = max(known.values(), default=1.0)
        return {t: known.get(t, top) for t in available}

    def probabilities(self, available: Sequence[str]) -> torch.Tensor:
        priority = torch.tensor(list(self.priorities(available).values()), dtype=torch.float64)
        p = priority / priority.sum() if priority.sum() > 0 else torch.full_like(priority, 1.0 / len(available))
        return (1 - self.exploration) * p + self.exploration / len(available)

    def select(self, step: int, available: Sequence[str], generator: torch.Generator) -> list[str]:
        if not available:
            return []
        return [available[i] for i in draw(self.probabilities(available), self.k, generator)]

    def observe(self, step: int, losses: Mapping[str, float]) -> None:
        for task, loss in losses.items():
            if task not in self.tasks or not math.isfinite(loss):
                continue
            if task not in self.initial:
                self.initial[task] = self.recent[task] = abs(float(loss))
            else:
                self.recent[task] = self.smoothing * self.recent[task] + (1 - self.smoothing) * abs(float(loss))

    def state_dict(self) -> dict:
        return {"initial": dict(self.initial), "recent": dict(self.recent)}

    def load_state_dict(self, state: Mapping) -> None:
        self.initial = {t: float(v) for t, v in state["initial"].items()}
        self.recent = {t: float(v) for t, v in state["recent"].items()}

    def __repr__(self) -> str:
        return f"LossPriority(k={self.k}, beta={self.beta}, smoothing={self.smoothing}, exploration={self.exploration})"
