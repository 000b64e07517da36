"""PCGrad: project away the conflicting component of each task gradient."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor

from polytask.methods import _small_qp
from polytask.methods._gramian_qp import as_float64
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
        # the T² sequential projections are scalar work: Python floats (float64) avoid the per-call
        # overhead of torch and of numpy on T-element rows
        assert step.gramian is not None
        if len(step.gramian) <= _small_qp.SMALL_T:  # few tasks: no tensor operation but the read
            g = _small_qp.symmetrised(step.gramian_values())  # exact doubles of any dtype
        else:
            g = as_float64(step.gramian, type(self).__name__).tolist()
        n = len(g)
        w = [0.0] * n
        for i in range(n):
            c = {i: 1.0}  # Cᵢ's nonzero entries, in the order they appear
            for j in torch.randperm(n, generator=step.generator).tolist():
                if j == i or not g[j][j] > 0:
                    continue
                row = g[j]
                dot = sum(row[k] * v for k, v in c.items())
                if dot < 0.0:
                    c[j] = c.get(j, 0.0) - dot / row[j]
            for k, v in c.items():
                w[k] += v
        return _small_qp.weights_like(w, step.gramian)
