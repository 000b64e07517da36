"""Proportional sampling: p(task) ∝ size of its data set."""

from __future__ import annotations

from torch import Tensor

from polytask.data.samplers.base import SAMPLERS, Sampler


@SAMPLERS.register("proportional")
class Proportional(Sampler):
    """pᵢ = nᵢ / Σⱼ nⱼ: every example is seen about once per epoch, large tasks dominate."""

    def probabilities(self, step: int, total_steps: int) -> Tensor:
        n = self._sizes()
        return n / n.sum()
