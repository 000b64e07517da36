"""Geometric Loss Strategy (GLS)."""

from __future__ import annotations

import math

from torch import Tensor

from polytask.methods._weighting import EPS, as_weights
from polytask.methods.base import Method, Step, register


@register("gls")
class GLS(Method):
    """Geometric loss strategy — Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream
    Feature Aggregation and Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.

        Total = (Πᵢ Lᵢ)^(1/T)

    expressed as detached weights wᵢ = Total / (T · Lᵢ): then Σ wᵢ Lᵢ = Total and
    Σ wᵢ ∇Lᵢ = ∇Total, so one weighted backward is exactly the geometric mean's gradient.
    Losses must be positive; they are floored at 1e-8.
    """

    needs = "losses"

    def __init__(self) -> None:
        super().__init__()
        self._remember()

    def weights(self, step: Step) -> Tensor:
        losses = [max(x, EPS) for x in step.losses.tolist()]  # T numbers: host arithmetic (see PerTaskMethod)
        total = math.exp(math.fsum(math.log(x) for x in losses) / len(losses))
        return as_weights([total / (len(losses) * x) for x in losses], step)
