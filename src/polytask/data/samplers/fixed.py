"""Fixed sampling: the user's probabilities per task name."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError, closest
from polytask.data.samplers.base import SAMPLERS, Sampler


@SAMPLERS.register("fixed")
class Fixed(Sampler):
    """pᵢ = wᵢ / Σⱼ wⱼ with user-given weights wᵢ ≥ 0 per task name: a hand-tuned task mixture.

    ``weights`` must name every task (0 switches a task off; at least one must be > 0); they are
    normalised, so ``{a: 2, b: 1}`` and ``{a: 0.66, b: 0.33}`` are the same sampler.
    """

    def __init__(self, *, weights: Mapping[str, float] | None = None) -> None:
        if not isinstance(weights, Mapping) or not weights:
            raise InvalidParameterError(f"`weights` of `fixed` sampler must map task names to numbers (required); found {weights!r}")
        for task, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InvalidParameterError(f"`weights` of `fixed` sampler must be finite and >= 0; found {value!r} for '{task}'")
        if sum(weights.values()) <= 0:
            raise InvalidParameterError(f"`weights` of `fixed` sampler must have a positive sum; found {dict(weights)}")
        self.weights = {str(t): float(v) for t, v in weights.items()}

    def setup(self, sizes: Mapping[str, int]) -> None:
        super().setup(sizes)
        for task in self.weights:
            if task not in self.tasks:
                raise InvalidParameterError(
                    f"`weights` of `fixed` sampler name task '{task}', which is not a task.{closest(task, self.tasks)} "
                    f"Tasks: {', '.join(self.tasks)}")
        missing = [t for t in self.tasks if t not in self.weights]
        if missing:
            raise InvalidParameterError(f"`weights` of `fixed` sampler must give every task a weight; missing: {', '.join(missing)}")
        if sum(self.weights[t] for t in self.tasks) <= 0:
            raise InvalidParameterError("`weights` of `fixed` sampler are all 0")

    def probabilities(self, step: int, total_steps: int) -> Tensor:
        w = torch.tensor([self.weights[t] for t in self.tasks], dtype=torch.float64)
        return w / w.sum()

    def __repr__(self) -> str:
        return f"Fixed(weights={self.weights})"
