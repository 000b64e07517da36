"""IMTL-G: the update whose projections onto every unit task gradient are equal."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._gramian_qp import as_float64, to_step
from polytask.methods.base import Method, Step, register


@register("imtl_g")
class IMTLG(Method):
    """Impartial MTL, gradient part — Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021.

    IMTL-G asks for d = Σ wᵢ gᵢ with Σ wᵢ = 1 and equal projections uᵢᵀd onto the unit gradients
    uᵢ = gᵢ/‖gᵢ‖. The paper's closed form w₂..T = g₁Uᵀ(DUᵀ)⁻¹ (D, U: rows g₁ − gᵢ, u₁ − uᵢ) is,
    from the Gramian alone, (Gw)ᵢ / ‖gᵢ‖ = const, i.e. w ∝ G⁻¹n with nᵢ = √Gᵢᵢ, normalised to
    Σw = 1. G is scaled by its mean diagonal first (w does not depend on the scale of G).

    Departures: for a singular G (linearly dependent gradients) this is TorchJD's generalisation,
    w ∝ G⁺n (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024,
    arXiv:2406.16232), and w = 0 when Σ G⁺n vanishes (|Σ| ≤ 1e-12 on the scaled G). It is the
    paper's solution whenever n lies in the range of G: duplicated tasks (equal weights), all
    gradients along one direction, a zero gradient (weight 0, equal projections for the others).
    Otherwise the paper's equations leave only d = 0, and G⁺n is their least-squares solution
    instead: at two exactly opposed gradients g₂ = −c g₁ (a Pareto-stationary point) it gives
    w = (1, −c)/(1 − c), d = (1 + c²)/(1 − c) g₁ (along the larger gradient, against the other
    task), and w = 0 when c = 1. Nearly opposed gradients (G invertible) get the paper's solution,
    which tends to d = 0.
    """

    needs = "gramian"

    def weights(self, step: Step) -> Tensor:
        return to_step(imtl_g_weights(as_float64(step.gramian, type(self).__name__)), step.gramian)


def imtl_g_weights(g: Tensor) -> Tensor:
    """IMTL-G's w ∝ G⁺n, Σw = 1, of a float64 Gramian (shared with ``imtl``, which feeds it scaled gradients)."""
    scale = float(g.diagonal().mean())
    g = g / scale if scale > 0 else g  # the 1e-12 below is then relative to the gradients' scale
    v = torch.linalg.pinv(g, hermitian=True) @ g.diagonal().clamp_min(0).sqrt()
    total = v.sum()
    return v / total if total.abs() > 1e-12 else torch.zeros_like(v)
