"""FairGrad: α-fair resource allocation between tasks."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._gramian_qp import as_float64
from polytask.methods.base import Method, Step, check_positive, register
from polytask.methods.mgda import min_norm


@register("fairgrad")
class FairGrad(Method):
    """FairGrad — Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (Eq. 4,
    Algorithm 1).

    The update d = Jᵀ w maximises the α-fair utility Σᵢ (gᵢᵀ d)^(1−α)/(1−α); its optimality
    condition is G w = w^(−1/α) with w > 0 (α = 1 is Nash-MTL's G w = 1/w; α → ∞ tends to
    max-min fairness). For α > 0 the solution is the unique minimiser of the strictly convex
    ½ wᵀ G w − Σᵢ h(wᵢ), h′(w) = w^(−1/α); we find it with ``scipy.optimize.least_squares`` on
    the residual G w − w^(−1/α) in u = log w (so w > 0 holds by construction) with the exact
    Jacobian, to ``tolerance``. When G is singular the condition may have no solution; the
    least-squares point is returned then, as in the reference code. α = 0 (linear scalarisation)
    is plain equal weighting: use ``equal``.

    Departures:
        G is divided by its mean diagonal s before solving (w = s^(−α/(α+1)) w̃ undoes it), so the
        solver's tolerances mean the same at gradients of 1e−12 and of 1e12. At a
        Pareto-stationary point (the min-norm point of the gradients' hull is 0 relative to
        their norms, including all gradients 0) the condition has no solution and the
        least-squares point is huge (1e7 for g₂ = −2g₁); the weights are then 1 for every task.
    """

    needs = "gramian"

    def __init__(self, *, alpha: float = 1.0, tolerance: float = 1e-12, max_evaluations: int = 1000) -> None:
        super().__init__()
        self.alpha = check_positive("FairGrad", "alpha", alpha)
        self.tolerance = check_positive("FairGrad", "tolerance", tolerance)
        if not isinstance(max_evaluations, int) or isinstance(max_evaluations, bool) or max_evaluations < 1:
            raise InvalidParameterError(
                f"`max_evaluations` of `FairGrad` must be an int >= 1; found {max_evaluations!r}")
        self.max_evaluations = max_evaluations
        self._remember(alpha=alpha, tolerance=tolerance, max_evaluations=max_evaluations)

    def weights(self, step: Step) -> Tensor:
        g = as_float64(step.gramian, "FairGrad")
        scale = float(g.diagonal().mean()) if len(g) else 0.0
        _, stationary = min_norm(g)
        if not (math.isfinite(scale) and scale > 0) or stationary <= max(1e-10, len(g) * torch.finfo(step.gramian.dtype).eps):
            w = np.ones(len(g))  # no solution of G w = w^(−1/α): see Departures
        else:  # G w = w^(−1/α)  ⇔  (G/s) w̃ = w̃^(−1/α) with w = s^(−α/(α+1)) w̃: tolerances act on unit scale
            w = solve_fair((g / scale).numpy(), self.alpha, self.tolerance, self.max_evaluations)
            w = w * scale ** (-self.alpha / (self.alpha + 1))
        return torch.as_tensor(w, dtype=step.losses.dtype, device=step.losses.device)


def solve_fair(gramian: np.ndarray, alpha: float, tolerance: float = 1e-12, max_evaluations: int = 1000) -> np.ndarray:
    """w > 0 with G w = w^(−1/α), solved in log-space by trust-region least squares."""
    from scipy.optimize import least_squares  # here: scipy.optimize takes ~0.4 s to import, half the methods'

    inv_alpha = 1.0 / alpha
    mean_row = max(float(gramian.sum()) / len(gramian), np.finfo(float).tiny)
    u0 = np.full(len(gramian), -alpha / (alpha + 1) * np.log(mean_row))  # exact when G = c·11ᵀ/T

    def residual(u: np.ndarray) -> np.ndarray:
        return gramian @ np.exp(u) - np.exp(-inv_alpha * u)

    def jacobian(u: np.ndarray) -> np.ndarray:
        return gramian * np.exp(u)[None, :] + np.diag(inv_alpha * np.exp(-inv_alpha * u))

    res = least_squares(residual, u0, jac=jacobian, xtol=tolerance, ftol=tolerance, gtol=tolerance,
                        max_nfev=max_evaluations)
    return np.exp(res.x)
