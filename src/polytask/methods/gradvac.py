"""GradVac: pull each pairwise gradient cosine up to an adaptive (EMA) target."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._gramian_qp import as_float64, to_step
from polytask.methods._weighting import PerTaskMethod
from polytask.methods.base import Step, register

_EPS = 1e-8


@register("gradvac")
class GradVac(PerTaskMethod):
    """Gradient Vaccine — Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1.

    For each task i, in a random order of the others j, with φᵢⱼ = cos(g_i^PC, gⱼ) and EMA target
    φ̂ᵢⱼ: if φᵢⱼ < φ̂ᵢⱼ, g_i^PC += ‖g_i^PC‖(φ̂ᵢⱼ√(1−φᵢⱼ²) − φᵢⱼ√(1−φ̂ᵢⱼ²)) / (‖gⱼ‖√(1−φ̂ᵢⱼ²)) · gⱼ;
    then φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφᵢⱼ. The update is Σᵢ g_i^PC, tracked as coefficients over the gₖ from
    G alone. Differences from the paper: one θ (all shared parameters) instead of per-layer
    targets, and β = 0.5 by default (LibMTL's and TorchJD's default). The targets φ̂ (a T×T buffer
    over the setup() tasks, zero-initialised) are the only state, with the task names, so a fresh
    method loads a saved state; orders come from ``step.generator`` (same draws as TorchJD's GradVac).
    """

    needs = "gramian"
    stateful = True
    permutation_equivariant: ClassVar[bool] = False

    def __init__(self, *, beta: float = 0.5) -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0.0 <= beta <= 1.0):
            raise InvalidParameterError(f"`beta` of `GradVac` must be in [0, 1]; found {beta!r}")
        self.beta = float(beta)
        self.register_buffer("targets", torch.zeros(0, 0, dtype=torch.float64))
        self._remember(beta=beta)

    def reset_state(self, num_tasks: int) -> None:
        self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)

    def weights(self, step: Step) -> Tensor:
        g = as_float64(step.gramian, type(self).__name__)
        idx = self.index(step).tolist()
        n = len(g)
        # T² sequential scalar updates: numpy float64 avoids torch's per-op overhead
        gn = g.numpy()
        targets = self.targets.detach().cpu().numpy().copy()
        c = np.eye(n)
        norms = np.sqrt(np.clip(np.diagonal(gn), 0, None))
        for i in range(n):
            cg = c[i] @ gn
            others = [j for j in range(n) if j != i]
            for j in [others[k] for k in torch.randperm(n - 1, generator=step.generator).tolist()]:
                norm_i = max(float(cg @ c[i]), 0.0) ** 0.5
                phi = float(cg[j] / (norm_i * norms[j] + _EPS))
                target = float(targets[idx[i], idx[j]])
                if phi < target:
                    s_phi, s_hat = max(1 - phi * phi, 0.0) ** 0.5, max(1 - target * target, 0.0) ** 0.5
                    step_ij = norm_i * (target * s_phi - phi * s_hat) / (norms[j] * s_hat + _EPS)
                    c[i, j] += step_ij
                    cg = cg + step_ij * gn[j]
                targets[idx[i], idx[j]] = (1 - self.beta) * target + self.beta * phi
        self.targets.copy_(torch.from_numpy(targets))
        return to_step(torch.from_numpy(c.sum(axis=0)), step.gramian)
