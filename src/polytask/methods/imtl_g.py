"""IMTL-G: the update whose projections onto every unit task gradient are equal."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._gramian_qp import as_float64, to_step
from polytask.methods.base import Method, Step, register


@register("imtl_g")
class IMTLG(Method):
    """Impartial MTL, gradient part — Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021.

    IMTL-G asks for d = Σ wᵢ gᵢ with Σ wᵢ = 1 and equal projections uᵢᵀd onto the unit gradients
    uᵢ = gᵢ/‖gᵢ‖. The paper's closed form w₂..T = g₁Uᵀ(DUᵀ)⁻¹ (D, U: rows g₁ − gᵢ, u₁ − uᵢ) is,
    from the Gramian alone, (Gw)ᵢ / ‖gᵢ‖ = const, i.e. w ∝ G⁻¹n with nᵢ = √Gᵢᵢ, normalised to
    Σw = 1. The pseudo-inverse extends it to linearly dependent gradients (as TorchJD does).
    """

    needs = "gramian"

    def weights(self, step: Step) -> Tensor:
        g = as_float64(step.gramian, type(self).__name__)
        v = torch.linalg.pinv(g, hermitian=True) @ g.diagonal().clamp_min(0).sqrt()
        total = v.sum()
        w = v / total if total.abs() > 1e-12 else torch.zeros_like(v)
        return to_step(w, step.gramian)
