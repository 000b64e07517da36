"""Uniform sampling over tasks."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.data.samplers.base import SAMPLERS, Sampler


@SAMPLERS.register("uniform")
class Uniform(Sampler):
    """pᵢ = 1/T whatever the sizes: small tasks are revisited (and may overfit) more often."""

    def probabilities(self, step: int, total_steps: int) -> Tensor:
        return torch.full((len(self.tasks),), 1.0 / len(self.tasks), dtype=torch.float64)
