"""UPGrad: average of the task gradients, each projected onto the dual cone of all of them."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._gramian_qp import as_float64, project_dual_cone, to_step
from polytask.methods.base import Method, Step, register


@register("upgrad")
class UPGrad(Method):
    """Unconflicting projection of gradients — Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", 2024 (arXiv:2406.16232), Section 3.

    d = (1/T) Σᵢ π(gᵢ), where π projects onto the dual cone {x : Jx ≥ 0} of the task gradients.
    By their Proposition 1, π(gᵢ) = Jᵀvᵢ with vᵢ = argmin_{v ≥ eᵢ} vᵀGv (one T-variable QP each,
    quadprog), so w = (1/T) Σᵢ vᵢ. Every gⱼᵀd ≥ 0 (non-conflicting) and w ≥ 1/T.
    """

    needs = "gramian"

    def weights(self, step: Step) -> Tensor:
        g = as_float64(step.gramian, type(self).__name__)
        n = len(g)
        w = project_dual_cone(g, torch.eye(n, dtype=torch.float64)).mean(dim=0)
        return to_step(w, step.gramian)
