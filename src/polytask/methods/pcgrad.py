"""PCGrad: project away the conflicting component of each task gradient."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from polytask.methods._gramian_qp import as_float64, to_step
from polytask.methods.base import Method, Step, register


@register("pcgrad")
class PCGrad(Method):
    """Gradient surgery — Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1.

    For each task i, in a random order of the other tasks j: if g_i^PCᵀgⱼ < 0, then
    g_i^PC ← g_i^PC − (g_i^PCᵀgⱼ / ‖gⱼ‖²) gⱼ; the update is the sum Σᵢ g_i^PC (as in the paper).
    Each g_i^PC = Σₖ Cᵢₖ gₖ is tracked by its coefficient row Cᵢ, so g_i^PCᵀgⱼ = (Cᵢ G)ⱼ and a
    projection is Cᵢⱼ −= (CᵢG)ⱼ / Gⱼⱼ; w = Σᵢ Cᵢ. The orders come from ``step.generator``
    (one ``randperm`` per task, the same draws as TorchJD's PCGrad).
    """

    needs = "gramian"
    stateful = True  # random task orders
    permutation_equivariant: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self._remember()

    def weights(self, step: Step) -> Tensor:
        # the T² sequential projections are scalar work: numpy float64 avoids torch's per-op overhead
        g = as_float64(step.gramian, type(self).__name__).numpy()
        n = len(g)
        w = np.zeros(n)
        for i in range(n):
            c = np.zeros(n)
            c[i] = 1.0
            for j in torch.randperm(n, generator=step.generator).tolist():
                dot = float(g[j] @ c)
                if j != i and dot < 0.0 and g[j, j] > 0:
                    c[j] -= dot / g[j, j]
            w += c
        return to_step(torch.from_numpy(w), step.gramian)
