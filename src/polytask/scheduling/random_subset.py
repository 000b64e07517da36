"""Random subset: k tasks drawn uniformly at random each step."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polytask.scheduling.base import TASK_SCHEDULERS, TaskScheduler, check_param, draw, is_count


@TASK_SCHEDULERS.register("random_subset")
class RandomSubset(TaskScheduler):
    """S ~ Uniform{S ⊆ available : |S| = min(k, |available|)}: each task is trained with probability k/T.

    The simple stochastic baseline of task selection (train a random subset of tasks per step);
    k = 1 alternates single tasks at random. Draws use the generator the trainer passes (its seeded
    sampler generator, checkpointed), so a seed fixes the whole sequence of subsets.
    """

    def __init__(self, *, k: int = 1) -> None:
        check_param(is_count(k), "k", "random_subset", "an int >= 1", k)
        self.k = k

    def select(self, step: int, available: Sequence[str], generator: torch.Generator) -> list[str]:
        if not available:
            return []
        uniform = torch.ones(len(available), dtype=torch.float64)
        return [available[i] for i in draw(uniform, self.k, generator)]

    def __repr__(self) -> str:
        return f"RandomSubset(k={self.k})"
