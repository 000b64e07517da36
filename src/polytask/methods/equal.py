"""Equal weighting: the plain sum of task losses."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods.base import Method, Step, register


@register("equal")
class Equal(Method):
    """Equal weights: Total = Σᵢ Lᵢ (wᵢ = 1), the baseline every MTL paper reports as EW."""

    needs = "losses"
    constant_weights = True

    def weights(self, step: Step) -> Tensor:
        return torch.ones_like(step.losses)
