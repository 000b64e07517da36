"""CAGrad: the best worst-case improvement within a ball around the mean gradient."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods import _small_qp
from polytask.methods._gramian_qp import as_float64, eigh_np, factor_np, project_polyhedron_np, to_step
from polytask.methods.base import Method, Step, check_positive, register


@register("cagrad")
class CAGrad(Method):
    """Conflict-averse gradient descent — Liu et al., "Conflict-Averse Gradient Descent for
    Multi-task Learning", NeurIPS 2021, Algorithm 1.

    d = argmax_d minᵢ gᵢᵀd s.t. ‖d − g₀‖ ≤ r, with g₀ the mean gradient and r = c‖g₀‖. The paper
    solves the dual min_{w ∈ Δ} wᵀGe/T + r√(wᵀGw) and sets d = g₀ + r g_w/‖g_w‖. Solved exactly
    here through its primal: for a level t, x(t) = argmin ‖x‖² s.t. gᵢᵀ(g₀ + x) ≥ t is a QP whose
    multipliers y ≥ 0 give x = Jᵀy; ‖x(t)‖ grows with t and the optimum is the t with ‖x(t)‖ = r.
    That t is found by a safeguarded root search that is exact on each active set (there y(t) is
    affine in t, so ‖x(t)‖² = r² is a quadratic), each QP in the rank-k factor of G by quadprog.
    Then w = 1/T + y (y = r w_dual/‖g_w‖), divided by (1 + c²) when ``rescale`` (the official
    code's default ``rescale=1``). ``c = 0`` gives the mean gradient. ``rescale`` takes the official
    code's (and LibMTL's) integer choices too: 0 (= False, no division), 1 (= True, 1 + c²) and
    2 (1 + c).

    Up to :data:`~polytask.methods._small_qp.SMALL_T` tasks the same search runs on plain Python
    floats, each level's QP as its dual, y = argmin_{y ≥ 0} ½yᵀGy + (b − t)ᵀy
    (:func:`~polytask.methods._small_qp.nonneg_qp`); a singular face hands the step to the numpy path.
    """

    needs = "gramian"

    def __init__(self, *, c: float = 0.4, rescale: bool | int = True) -> None:
        super().__init__()
        self.c = check_positive("CAGrad", "c", c, allow_zero=True)
        if not (isinstance(rescale, bool) or (isinstance(rescale, int) and rescale in (0, 1, 2))):
            raise InvalidParameterError(
                f"`rescale` of `CAGrad` must be a bool or 0, 1, 2 (none, 1 + c², 1 + c); found {rescale!r}")
        self.rescale = rescale
        self._remember(c=c, rescale=rescale)

    def weights(self, step: Step) -> Tensor:
        assert step.gramian is not None
        if len(step.gramian) <= _small_qp.SMALL_T:
            # few tasks: plain Python floats, which stay fast inside a step where numpy does not
            w = self._weights_small(step.gramian_values())
            if w is not None:
                return _small_qp.weights_like(w, step.gramian)
        g = as_float64(step.gramian, type(self).__name__).numpy()
        n = len(g)
        w = np.full(n, 1.0 / n)
        scale = float(np.trace(g)) / len(g)
        if self.c > 0 and scale > 0:
            g = g / scale  # the weights do not depend on the scale of G
            b = g.sum(axis=1) / n  # gᵢᵀg₀
            radius = self.c * max(float(b.sum() / n), 0.0) ** 0.5  # c‖g₀‖
            if radius > 0:
                w = w + _ball_multipliers(g, b, radius)
        if self.rescale == 1:  # True too
            w = w / (1 + self.c**2)
        elif self.rescale == 2:
            w = w / (1 + self.c)
        return to_step(torch.from_numpy(w), step.gramian)

    def _weights_small(self, g: list[list[float]]) -> list[float] | None:
        """:meth:`weights` on a list-of-rows Gramian (None: hand it to the numpy path)."""
        n = len(g)
        w = [1.0 / n] * n
        scale = sum(g[i][i] for i in range(n)) / n
        if self.c > 0 and scale > 0:
            if not math.isfinite(scale):
                return None
            g = _small_qp.symmetrised([[v / scale for v in row] for row in g])
            b = [sum(row) / n for row in g]
            radius = self.c * max(sum(b) / n, 0.0) ** 0.5
            if radius > 0:
                y = _ball_multipliers_small(g, b, radius)
                if y is None:
                    return None
                w = [wi + yi for wi, yi in zip(w, y, strict=True)]
        divisor = 1 + self.c**2 if self.rescale == 1 else 1 + self.c if self.rescale == 2 else 1.0
        return [wi / divisor for wi in w]


def _ball_multipliers(g: np.ndarray, b: np.ndarray, radius: float, iters: int = 100) -> np.ndarray:
    """y ≥ 0 with ‖Jᵀy‖ = radius, Jᵀy = argmin ‖x‖² s.t. b + Jx ≥ t for the matching level t
    (float64 numpy arrays: a step is a handful of T×T operations and quadprog calls)."""
    f, target = factor_np(g), radius**2
    zero = np.zeros(f.shape[1])

    def solve(t: float) -> tuple[np.ndarray, float]:
        sol = project_polyhedron_np(f, zero, t - b)
        return (np.zeros_like(b), float("inf")) if sol is None else (sol[1], float(sol[0] @ sol[0]))

    lo = float(b.min())  # x = 0 is feasible: ‖x‖ = 0
    hi = float((b + radius * np.sqrt(np.clip(np.diagonal(g), 0.0, None))).min())  # no d in the ball does better
    y_lo = np.zeros_like(b)
    y, val = solve(hi)
    while val < target:  # round-off only: widen
        lo, y_lo, hi = hi, y, hi + (hi - lo) + 1e-12
        y, val = solve(hi)
    t, best = hi, (y if val < float("inf") else None)
    for _ in range(iters):
        if abs(val - target) <= 1e-10 * target or hi - lo <= 1e-14 * (abs(lo) + abs(hi)):
            break
        if val < target:
            lo, y_lo = t, y
        else:
            hi, best = t, (y if val < float("inf") else best)
        t = _piece_root(g, b, y if val < float("inf") else y_lo, target, lo, hi)
        y, val = solve(t)
    if val < float("inf"):
        return y
    # the last level had no feasible x (exactly opposed gradients make the top of the range
    # infeasible up to round-off): the feasible multipliers found closest to the ball's boundary,
    # not the zeros of an infeasible solve (which gave the mean gradient)
    return best if best is not None else y_lo


def _ball_multipliers_small(g: list[list[float]], b: list[float], radius: float,
                            iters: int = 100) -> list[float] | None:
    """:func:`_ball_multipliers` on Python floats (G with unit mean diagonal); None where a level's
    QP is singular on a face, which the numpy path's factored solve handles."""
    target = radius**2
    scale = sum(g[i][i] for i in range(len(g))) / len(g)  # what each level's QP would compute again

    def solve(t: float) -> tuple[list[float], float] | None:
        y = _small_qp.nonneg_qp(g, [bi - t for bi in b], scale=scale)
        if y is None:
            return None
        return y, _small_qp.quadratic(g, y)

    lo = min(b)
    hi = min(bi + radius * max(g[i][i], 0.0) ** 0.5 for i, bi in enumerate(b))
    sol = solve(hi)
    for _ in range(60):  # round-off only: widen
        if sol is None or sol[1] >= target:
            break
        lo, hi = hi, hi + (hi - lo) + 1e-12
        sol = solve(hi)
    if sol is None or sol[1] < target:
        return None
    (y, val), t = sol, hi
    for _ in range(iters):
        if abs(val - target) <= 1e-10 * target or hi - lo <= 1e-14 * (abs(lo) + abs(hi)):
            break
        if val < target:
            lo = t
        else:
            hi = t
        t = _piece_root_small(g, b, y, target, lo, hi)
        sol = solve(t)
        if sol is None:
            return None
        y, val = sol
    return y


def _piece_root_small(g: list[list[float]], b: list[float], y: list[float], target: float, lo: float,
                      hi: float) -> float:
    """:func:`_piece_root` on Python floats: y_F(t) = G_FF⁻¹(t·1 − b_F) by Cholesky (bisect if singular)."""
    mid = (lo + hi) / 2
    cut = 1e-12 * max(max(y), 1e-300)
    free = [i for i, v in enumerate(y) if v > cut]
    if not free:
        return mid
    solved = _small_qp.cholesky_solve(g, free, [[1.0] * len(free), [b[i] for i in free]], _small_qp.PIVOT)
    if solved is None:
        return mid
    p, q = solved
    gp = [sum(g[i][k] * pk for k, pk in zip(free, p, strict=True)) for i in free]
    gq = [sum(g[i][k] * qk for k, qk in zip(free, q, strict=True)) for i in free]
    qa = _small_qp.dot(p, gp)
    qb = -2 * _small_qp.dot(p, gq)
    qc = _small_qp.dot(q, gq) - target
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return mid
    t = (-qb + disc**0.5) / (2 * qa)
    return t if lo < t < hi else mid


def _pinv_symmetric(a: np.ndarray) -> np.ndarray:
    """Moore–Penrose inverse of a symmetric matrix by its eigendecomposition, with
    ``torch.linalg.pinv(hermitian=True)``'s cut-off (eigenvalues |λ| ≤ k·eps·max |λ| dropped).
    Not least squares: MKL's lstsq differs in the last bits from call to call (memory
    alignment), which made the weights of identical steps differ."""
    vals, vecs = eigh_np(a)
    magnitude = np.abs(vals)
    cutoff = len(a) * np.finfo(a.dtype).eps * (float(magnitude.max()) if magnitude.size else 0.0)
    inverse = np.divide(1.0, vals, out=np.zeros_like(vals), where=magnitude > cutoff)
    return (vecs * inverse) @ vecs.T


def _piece_root(g: np.ndarray, b: np.ndarray, y: np.ndarray, target: float, lo: float, hi: float) -> float:
    """t with yᵀGy = target if the active set of y is kept (y_F = G_FF⁺(t − b_F)); else bisect."""
    free = y > 1e-12 * max(float(y.max()), 1e-300)
    mid = (lo + hi) / 2
    if not bool(free.any()):
        return mid
    gff = g[np.ix_(free, free)]
    sol = _pinv_symmetric(gff) @ np.stack([np.ones(int(free.sum())), b[free]], axis=1)
    p, q = sol[:, 0], sol[:, 1]  # y_F(t) = t·p − q
    qa, qb, qc = float(p @ gff @ p), float(-2 * (p @ gff @ q)), float(q @ gff @ q) - target
    disc = qb * qb - 4 * qa * qc
    if qa <= 0 or disc < 0:
        return mid
    t = (-qb + disc**0.5) / (2 * qa)
    return t if lo < t < hi else mid
