"""Nash-MTL: the Nash bargaining solution over the task gradients, Gw = 1/w."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods import _small_qp
from polytask.methods._gramian_qp import as_float64, to_step
from polytask.methods._weighting import PerTaskMethod
from polytask.methods.base import Step, check_positive, register
from polytask.methods.mgda import min_norm_np, nearest_psd_np

#: Smallest ‖d_min‖² / mean ‖gᵢ‖² (d_min: the min-norm point of the convex hull of the gradients)
#: at which the bargaining problem is solved; below it (or below T·eps of the Gramian's dtype, its
#: round-off) the point counts as Pareto-stationary. The weights grow like 1/‖d_min‖, ~1e5 here.
STATIONARY = 1e-10


@register("nash_mtl")
class NashMTL(PerTaskMethod):
    """Multi-task learning as a bargaining game — Navon, Shamsian, Achituve, Maron, Kawaguchi,
    Chechik & Fetaya, "Multi-Task Learning as a Bargaining Game", ICML 2022, Algorithm 1.

    The weights solve Gw = 1/w, w > 0 (the bargaining solution of their Section 3; then
    ‖Σ wᵢ gᵢ‖² = wᵀGw = T). ``max_norm`` > 0 rescales w so that ‖Σ wᵢ gᵢ‖ ≤ max_norm.
    ``update_weights_every`` re-solves every k calls and reuses the last weights in between (while
    the same tasks are active); the cached weights and the call counter are buffers and the task
    names travel with them, so resuming (into a fresh method as well) is exact.

    Departures:

    - Solver. Instead of the paper's sequence of convex programs (CCP, solved with cvxpy), Gw = 1/w
      is solved exactly with damped Newton on the self-concordant, strictly convex
      f(w) = ½wᵀGw − Σ log wᵢ, whose stationary point it is. G is scaled by its mean diagonal
      (the official code divides by ‖G‖_F and multiplies the factor back into its constraint:
      the same equation) and replaced by its nearest positive semi-definite matrix (a Gramian
      rounded in float32 or bfloat16 can be slightly indefinite).
    - Pareto-stationary points. Gw = 1/w has a positive solution exactly when 0 is not in the
      convex hull of the gradients (f is then coercive on w > 0; otherwise it decreases without
      bound along the cancelling combination): at a Pareto-stationary point no direction improves
      every task and the bargaining problem of the paper has no solution. Such a point (two
      opposed gradients, a zero gradient) is detected as ‖d_min‖² ≤ max(1e-10, T·eps of the
      Gramian's dtype)·mean ‖gᵢ‖², d_min the min-norm point of the hull (MGDA's direction). There
      the official code's solver fails and it keeps its previous weights, ones at the first step
      (as TorchJD's port does); so does this one: the last weights of the same active tasks, else
      ones, then the ``max_norm`` clipping. Near such a point the weights are large (~1/‖d_min‖)
      while ‖d‖ stays √T.
    - ``max_norm`` scales all the weights, so the heads' gradients scale with the shared one (the
      official code clips the shared gradient only).

    Up to :data:`~polytask.methods._small_qp.SMALL_T` tasks the same Newton iteration runs on plain
    Python floats (:func:`solve_nash_small`) where G is positive definite (its Cholesky factor
    exists: then G is its own nearest PSD matrix); a singular or indefinite G takes the numpy path.
    """

    needs = "gramian"
    stateful = True
    #: its arithmetic is on the host (the Gramian comes as a float64 CPU tensor), so its state stays
    #: there wherever the method is moved (on CUDA a device copy met the host's active-task mask)
    host_buffers = ("calls", "last_weights", "last_active")

    def __init__(self, *, max_norm: float = 1.0, update_weights_every: int = 1) -> None:
        super().__init__()
        self.max_norm = check_positive("NashMTL", "max_norm", max_norm, allow_zero=True)
        every = update_weights_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidParameterError(
                f"`update_weights_every` of `NashMTL` must be an int >= 1; found {update_weights_every!r}")
        self.update_weights_every = update_weights_every
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_weights", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("last_active", torch.zeros(0, dtype=torch.bool))
        self._remember(max_norm=max_norm, update_weights_every=update_weights_every)

    def reset_state(self, num_tasks: int) -> None:
        self.last_weights = torch.zeros(num_tasks, dtype=torch.float64)
        self.last_active = torch.zeros(num_tasks, dtype=torch.bool)

    def weights(self, step: Step) -> Tensor:
        assert step.gramian is not None
        if len(step.gramian) <= _small_qp.SMALL_T:
            w = self._weights_small(step)
            if w is not None:
                return w
        g = as_float64(step.gramian, type(self).__name__)
        order = self.index(step).tolist()
        active = torch.zeros(len(self.all_tasks), dtype=torch.bool)
        active[order] = True
        same_tasks = bool((active == self.last_active).all())
        if int(self.calls) % self.update_weights_every != 0 and same_tasks:
            w = self.last_weights[order]
        else:
            tol = max(STATIONARY, len(g) * torch.finfo(step.gramian.dtype).eps)
            w = solve_nash(g, stationary=tol)
            if w is None:  # Pareto-stationary: the previous weights, as the official code
                w = self.last_weights[order] if same_tasks else torch.ones(len(g), dtype=torch.float64)
            self.last_weights.zero_()
            self.last_weights[order] = w
            self.last_active.copy_(active)
        self.calls += 1
        if self.max_norm > 0:
            norm = max(float(w @ g @ w), 0.0) ** 0.5
            if norm > self.max_norm:
                w = w * (self.max_norm / norm)
        return to_step(w, step.gramian)

    def _weights_small(self, step: Step) -> Tensor | None:
        """:meth:`weights` for every task active in order, on Python floats (the buffers are written
        as the general path writes them); None (nothing changed) hands the step to that path."""
        assert step.gramian is not None
        tasks = getattr(self, "all_tasks", None)  # not set up yet: the general path sets it up
        if tasks is None or not self._indexed(step, tasks)[1]:
            return None
        rows = step.gramian_values()  # exact doubles of any dtype
        g = _small_qp.symmetrised(rows)
        # the state as Python values, written back once: a tensor operation per buffer read or
        # written cost more inside a small model's step than the Newton iterations
        calls, last_weights, last_active = self.host_values()
        same_tasks = len(last_active) == len(g) and all(last_active)
        if int(calls) % self.update_weights_every != 0 and same_tasks:
            w = last_weights
        else:
            tol = max(STATIONARY, len(g) * torch.finfo(step.gramian.dtype).eps)
            solved = solve_nash_small(g, stationary=tol)
            if solved is None:
                return None
            if solved is STATIONARY_POINT:  # the previous weights, as the official code
                w = last_weights if same_tasks else [1.0] * len(g)
            else:
                w = solved
            last_weights, last_active = w, [True] * len(g)
        self.store_host_values((int(calls) + 1, last_weights, last_active))
        if self.max_norm > 0:
            norm = max(_small_qp.quadratic(g, w), 0.0) ** 0.5
            if norm > self.max_norm:
                w = [wi * (self.max_norm / norm) for wi in w]
        return _small_qp.weights_like(w, step.gramian)


def solve_nash(g: Tensor, *, stationary: float = STATIONARY, iters: int = 500) -> Tensor | None:
    """w > 0 with Gw = 1/w (float64), or None where there is none: at a Pareto-stationary point
    (‖d_min‖² ≤ ``stationary`` · mean Gᵢᵢ) or if damped Newton on f(w) = ½wᵀGw − Σ log wᵢ fails."""
    w = solve_nash_np(g.numpy(), stationary=stationary, iters=iters)
    return None if w is None else torch.from_numpy(w)


def solve_nash_np(g: np.ndarray, *, stationary: float = STATIONARY, iters: int = 500) -> np.ndarray | None:
    """:func:`solve_nash` on a float64 array (numpy: each Newton step is a handful of T×T
    operations, where torch's per-call cost would dominate a small model's step)."""
    n = len(g)
    s = float(np.trace(g)) / n if n else 0.0
    if not (math.isfinite(s) and s > 0):
        return None
    a = nearest_psd_np(g / s)  # solve A u = 1/u, then w = u / √s
    u = 1.0 / np.sqrt(np.clip(np.diagonal(a), stationary, None))
    quadratic = float(u @ a @ u)
    checked = not quadratic > stationary * float(u @ u)  # Jᵀu (nearly) 0: likely Pareto-stationary
    if checked:
        if min_norm_np(g)[1] <= stationary:
            return None
        quadratic = max(quadratic, _TINY)
    u = u * (n / quadratic) ** 0.5  # best multiple of the diagonal solution
    decrement_sq = math.inf
    for k in range(iters):
        if k == _CHECK_AFTER and not checked:  # slow to converge: first make sure a solution exists
            checked = True
            if min_norm_np(g)[1] <= stationary:
                return None
        grad = a @ u - 1 / u
        delta = -np.linalg.solve(a + np.diag(1.0 / (u * u)), grad)
        previous, decrement_sq = decrement_sq, float(-(grad @ delta))  # ≥ 0: the Hessian is positive definite
        if not math.isfinite(decrement_sq) or decrement_sq < 1e-20:
            break
        if decrement_sq < 1e-12 and decrement_sq > previous / 4:  # at the round-off floor (ill-conditioned G)
            break
        decrement = max(decrement_sq, 0.0) ** 0.5
        u = u + (1.0 if decrement < 0.25 else 1.0 / (1.0 + decrement)) * delta  # stays in w > 0
    if not (math.isfinite(decrement_sq) and decrement_sq < 1e-10 and bool((u > 0).all())):
        return None
    # Pareto-stationary (‖d_min‖² ≤ stationary) has no solution, but round-off may let Newton stop at
    # one anyway. A solution bounds the min-norm point from below: with d = Σ uⱼaⱼ, aⱼᵀd = 1/uⱼ and
    # ‖d‖² = uᵀAu = T, so every convex combination x has ‖x‖ ≥ xᵀd / ‖d‖ ≥ 1 / (max u · √T). Only a
    # bound near the threshold calls for the QP (a small model's step used to pay for it every time).
    if not checked and 1.0 / (n * float(u.max()) ** 2) <= 4 * stationary and min_norm_np(g)[1] <= stationary:
        return None
    return u / s**0.5


#: :func:`solve_nash_small`'s answer at a Pareto-stationary point (its None hands G to the numpy path)
STATIONARY_POINT: list[float] = []


def solve_nash_small(g: list[list[float]], *, stationary: float = STATIONARY,
                     iters: int = 500) -> list[float] | None:
    """:func:`solve_nash_np` on a symmetric list-of-rows Gramian in plain Python floats, for few
    tasks (the reason: :mod:`._small_qp`). :data:`STATIONARY_POINT` where there is no solution;
    None where this path cannot vouch for its answer (G not positive definite, Newton not
    converged), which the numpy path then decides."""
    n = len(g)
    s = sum(g[i][i] for i in range(n)) / n if n else 0.0
    if not (math.isfinite(s) and s > 0):
        return None
    a = [[v / s for v in row] for row in g]
    everyone = list(range(n))
    # positive definite: its own nearest PSD matrix, and every Newton system below is too
    if _small_qp.cholesky_solve(a, everyone, [], _small_qp.PIVOT) is None:
        return None

    def min_norm_value() -> float | None:
        w = _small_qp.min_norm_weights(g)
        return None if w is None else max(_small_qp.quadratic(a, w), 0.0)

    u = [1.0 / math.sqrt(max(a[i][i], stationary)) for i in everyone]
    quadratic = _small_qp.quadratic(a, u)
    checked = not quadratic > stationary * _small_qp.dot(u, u)
    if checked:
        value = min_norm_value()
        if value is None:
            return None
        if value <= stationary:
            return STATIONARY_POINT
        quadratic = max(quadratic, _TINY)
    factor = (n / quadratic) ** 0.5
    u = [ui * factor for ui in u]
    decrement_sq = math.inf
    for k in range(iters):
        if k == _CHECK_AFTER and not checked:
            checked = True
            value = min_norm_value()
            if value is None:
                return None
            if value <= stationary:
                return STATIONARY_POINT
        grad = [v - 1.0 / ui for v, ui in zip(_small_qp.times(a, u), u, strict=True)]
        hessian = [row[:] for row in a]  # A + diag(1/u²): v + 0.0 off the diagonal is v
        for i, ui in enumerate(u):
            hessian[i][i] += 1.0 / (ui * ui)
        solved = _small_qp.cholesky_solve(hessian, everyone, [[-v for v in grad]], _small_qp.PIVOT)
        if solved is None:
            return None
        delta = solved[0]
        previous, decrement_sq = decrement_sq, -_small_qp.dot(grad, delta)
        if not math.isfinite(decrement_sq) or decrement_sq < 1e-20:
            break
        if decrement_sq < 1e-12 and decrement_sq > previous / 4:
            break
        decrement = max(decrement_sq, 0.0) ** 0.5
        step = 1.0 if decrement < 0.25 else 1.0 / (1.0 + decrement)
        u = [ui + step * di for ui, di in zip(u, delta, strict=True)]
    if not (math.isfinite(decrement_sq) and decrement_sq < 1e-10 and min(u) > 0):
        return None
    if not checked and 1.0 / (n * max(u) ** 2) <= 4 * stationary:
        value = min_norm_value()
        if value is None:
            return None
        if value <= stationary:
            return STATIONARY_POINT
    root = s**0.5
    return [ui / root for ui in u]


#: Newton steps after which the solver first checks that the point is not Pareto-stationary
#: (damped Newton from the diagonal start takes a handful where a solution exists)
_CHECK_AFTER = 20
_TINY = float(np.finfo(np.float64).tiny)
