"""MGDA: the min-norm point of the convex hull of the task gradients."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from polytask.methods import _small_qp
from polytask.methods._gramian_qp import NORMALISATIONS, as_float64, check_choice, eigh_np, normalisers, simplex_qp_np, to_step
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

    At a Pareto-stationary point (0 in the convex hull: opposed gradients, a zero gradient) the
    min-norm point is d = 0 and the weights are a convex combination that cancels, as in the paper.
    A Gramian rounded in low precision (bfloat16) may be slightly indefinite; it is first replaced
    by its nearest positive semi-definite matrix (negative eigenvalues set to 0), see :func:`min_norm`.

    Up to :data:`~polytask.methods._small_qp.SMALL_T` tasks (and ``normalization="none"``) the QP is
    solved in plain Python floats by :func:`~polytask.methods._small_qp.min_norm_weights`, which hands
    a problem with a singular face (or an indefinite one) back to the quadprog path above.
    """

    needs = "gramian"

    def __init__(self, *, normalization: str = "none") -> None:
        super().__init__()
        self.normalization = check_choice(type(self).__name__, "normalization", normalization, NORMALISATIONS)
        self._remember(normalization=normalization)

    def weights(self, step: Step) -> Tensor:
        assert step.gramian is not None
        if self.normalization == "none" and len(step.gramian) <= _small_qp.SMALL_T:
            # few tasks: plain Python floats, which stay fast inside a step where numpy does not
            w = _small_qp.min_norm_weights(step.gramian_values())
            if w is not None:
                return _small_qp.weights_like(w, step.gramian)
        g = as_float64(step.gramian, type(self).__name__)
        if self.normalization == "none":  # nᵢ = 1: skip dividing by ones
            return to_step(min_norm(g)[0], step.gramian)
        n = normalisers(g, step.losses, self.normalization)
        w = min_norm(g / (n[:, None] * n[None, :]))[0] / n
        return to_step(w, step.gramian)


def nearest_psd_np(g: np.ndarray) -> np.ndarray:
    """:func:`nearest_psd` on a float64 array."""
    vals, vecs = eigh_np(g)
    if bool((vals >= 0).all()):
        return g
    return (vecs * np.clip(vals, 0.0, None)) @ vecs.T


def nearest_psd(g: Tensor) -> Tensor:
    """The positive semi-definite matrix nearest to the symmetric ``g`` (Frobenius norm): its
    negative eigenvalues, round-off of a Gramian computed in low precision, set to 0."""
    a = g.numpy()
    psd = nearest_psd_np(a)
    return g if psd is a else torch.from_numpy(psd)


def min_norm_np(g: np.ndarray) -> tuple[np.ndarray, float]:
    """:func:`min_norm` on a float64 array."""
    n = len(g)
    scale = float(np.trace(g)) / len(g) if n else 0.0
    if not scale > 0:
        return np.full(n, 1.0 / max(n, 1)), 0.0
    gs = nearest_psd_np(g / scale)
    w = simplex_qp_np(gs, scaled=True)
    return w, max(float(w @ gs @ w), 0.0)


def min_norm(g: Tensor) -> tuple[Tensor, float]:
    """(w, ‖d‖² / mean Gᵢᵢ): the min-norm point d = Jᵀw of the convex hull of the gradients.

    The value is relative to the mean squared gradient norm (0 when every gradient is 0): 0 at a
    Pareto-stationary point, whatever the scale of the gradients.
    """
    w, value = min_norm_np(g.numpy())
    return torch.from_numpy(w), value
