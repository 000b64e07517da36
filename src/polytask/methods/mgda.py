"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

from torch import Tensor

from polytask.methods._gramian_qp import NORMALISATIONS, as_float64, check_choice, normalisers, simplex_qp, to_step
from polytask.methods.base import Method, Step, register


@register("mgda")
class MGDA(Method):
    """Multiple-gradient descent — Sener & Koltun, "Multi-Task Learning as Multi-Objective
    Optimization", NeurIPS 2018 (Désidéri's MGDA, their Algorithm 2 problem).

    w = argmin_{w ≥ 0, Σw = 1} ‖Σᵢ wᵢ gᵢ‖² = argmin wᵀGw, solved exactly with quadprog (the paper
    uses Frank–Wolfe). The result d = Σ wᵢ gᵢ satisfies gⱼᵀd ≥ ‖d‖² ≥ 0 for every task.

    ``normalization`` rescales gᵢ to gᵢ / nᵢ before solving (the paper's code): ``none`` (nᵢ = 1),
    ``l2`` (‖gᵢ‖), ``loss`` (Lᵢ) or ``loss+`` (Lᵢ‖gᵢ‖). As in LibMTL the min-norm weights then apply
    to the normalised gradients, wᵢ / nᵢ on the raw ones, which keeps gⱼᵀd ≥ 0.
    """

    needs = "gramian"

    def __init__(self, *, normalization: str = "none") -> None:
        super().__init__()
        self.normalization = check_choice(type(self).__name__, "normalization", normalization, NORMALISATIONS)
        self._remember(normalization=normalization)

    def weights(self, step: Step) -> Tensor:
        g = as_float64(step.gramian, type(self).__name__)
        n = normalisers(g, step.losses, self.normalization)
        w = simplex_qp(g / (n[:, None] * n[None, :])) / n
        return to_step(w, step.gramian)
