"""DualProj: the mean gradient projected onto the dual cone of the task gradients."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._gramian_qp import as_float64, project_dual_cone, to_step
from polytask.methods.base import Method, Step, register


@register("dualproj")
class DualProj(Method):
    """Dual projection — Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
    (arXiv:2406.16232); the projection is Eq. 11 of GEM (Lopez-Paz & Ranzato, NeurIPS 2017).

    d = π(ḡ), ḡ = (1/T) Σᵢ gᵢ, π the projection onto the dual cone {x : Jx ≥ 0}. By Proposition 1
    of Quinton & Rey, π(Jᵀu) = Jᵀv with v = argmin_{v ≥ u} vᵀGv; here u = 1/T, and w = v.
    """

    needs = "gramian"

    def weights(self, step: Step) -> Tensor:
        g = as_float64(step.gramian, type(self).__name__)
        u = torch.full((len(g),), 1.0 / len(g), dtype=torch.float64)
        return to_step(project_dual_cone(g, u), step.gramian)
