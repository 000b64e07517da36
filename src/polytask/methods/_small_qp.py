"""Exact T×T quadratic programs in plain Python floats, for the few-task case.

Why: inside a training step, after the backward passes, a call into numpy, LAPACK or quadprog costs
8–10 times what it costs in a loop of its own (measured on the tiny model of ``polytask bench small``:
one ``np.trace`` 39 µs against 4 µs, one ``quadprog.solve_qp`` 90 against 12, MGDA's whole numpy
solve 205 against 28), the price of code and data that the passes pushed out of the caches. Python's
own float arithmetic runs in the interpreter's loop, which stays warm: the same 300 multiply-adds cost
14 µs in a step and 16 in a loop. For T up to :data:`SMALL_T` the QPs below are a few hundred such
operations, so they are solved here; larger T, and any problem these cannot solve with confidence
(a singular block, too many iterations), go to the numpy/quadprog path of :mod:`._gramian_qp`.

The solver is the primal active-set method (Nocedal & Wright, "Numerical Optimization", 2nd ed.,
2006, Algorithm 16.3) for min ½ xᵀHx + qᵀx subject to x ≥ 0 and, optionally, Σx = 1, with H
positive definite on every face it visits (checked: each face's system is solved by Cholesky, and a
pivot below :data:`PIVOT` relative to H's mean diagonal hands the problem back to the caller). H
strictly convex on the final face makes the minimiser unique, so it agrees with quadprog's
(Goldfarb–Idnani) to round-off.

Departures from Algorithm 16.3: with Σx = 1 the face of every coordinate is tried first and taken
if its minimiser is positive (no bound is then active, so it is optimal: MGDA's min-norm point is
often interior, and this is one system where the active-set iteration would solve one per
coordinate added); otherwise the iteration starts at the best vertex. Without the equality it
starts at x = 0.
"""

from __future__ import annotations

import math
import operator

from torch import Tensor

from polytask.methods._host import host_tensor

#: the most tasks for which the methods take the plain-Python solvers
SMALL_T = 8
#: a Cholesky pivot (squared) below this, relative to the mean diagonal, counts as singular
PIVOT = 1e-10
#: optimality and feasibility tolerance, relative to the problem's scale
TOL = 1e-13

Matrix = list[list[float]]


def weights_like(values: list[float], like: Tensor) -> Tensor:
    """Weights computed here as a tensor in the dtype and on the device of the step's Gramian."""
    return host_tensor(values, like)


def dot(a: list[float], b: list[float]) -> float:
    """Σ aᵢbᵢ, left to right (``map`` keeps the loop in C: a generator costs twice as much)."""
    return sum(map(operator.mul, a, b))


def times(h: Matrix, x: list[float]) -> list[float]:
    """H x of a list-of-rows matrix."""
    return [dot(row, x) for row in h]


def quadratic(h: Matrix, x: list[float]) -> float:
    """xᵀHx."""
    return dot(x, times(h, x))


def symmetrised(g: Matrix) -> Matrix:
    """(G + Gᵀ) / 2 of a list-of-rows matrix (float64, as ``as_float64`` computes it)."""
    n = len(g)
    return [[(g[i][j] + g[j][i]) / 2 for j in range(n)] for i in range(n)]


def cholesky_solve(h: Matrix, index: list[int], rhs: list[list[float]], floor: float) -> list[list[float]] | None:
    """Solve H_FF x = b for each b in ``rhs`` (vectors over ``index``), or None when a squared
    pivot of H_FF's Cholesky factor is not above ``floor``."""
    m = len(index)
    if m <= 2:  # the loops below, unrolled: the active-set iterations mostly solve faces of one or two
        return _cholesky_solve_2(h, index, rhs, floor)
    if m == 4:  # and four: MGDA's interior point and Nash-MTL's Newton steps of four tasks
        return _cholesky_solve_4(h, index, rhs, floor)
    low: Matrix = [[0.0] * m for _ in range(m)]
    for a in range(m):
        row_a = h[index[a]]
        la = low[a]
        for b in range(a + 1):
            lb = low[b]
            s = row_a[index[b]]
            for k in range(b):
                s -= la[k] * lb[k]
            if a == b:
                if not s > floor:
                    return None
                la[a] = math.sqrt(s)
            else:
                la[b] = s / lb[b]
    out = []
    for vector in rhs:
        y = [0.0] * m
        for a in range(m):
            s = vector[a]
            la = low[a]
            for k in range(a):
                s -= la[k] * y[k]
            y[a] = s / la[a]
        for a in range(m - 1, -1, -1):
            s = y[a]
            for k in range(a + 1, m):
                s -= low[k][a] * y[k]
            y[a] = s / low[a][a]
        out.append(y)
    return out


def _cholesky_solve_2(h: Matrix, index: list[int], rhs: list[list[float]], floor: float) -> list[list[float]] | None:
    """:func:`cholesky_solve` for one or two indices, operation for operation."""
    a = index[0]
    s = h[a][a]
    if not s > floor:
        return None
    l00 = math.sqrt(s)
    if len(index) == 1:
        return [[(v[0] / l00) / l00] for v in rhs]
    b = index[1]
    l10 = h[b][a] / l00
    s = h[b][b] - l10 * l10
    if not s > floor:
        return None
    l11 = math.sqrt(s)
    out = []
    for v in rhs:
        y0 = v[0] / l00
        y1 = (v[1] - l10 * y0) / l11
        x1 = y1 / l11
        out.append([(y0 - l10 * x1) / l00, x1])
    return out


def _cholesky_solve_4(h: Matrix, index: list[int], rhs: list[list[float]], floor: float) -> list[list[float]] | None:
    """:func:`cholesky_solve` for four indices, operation for operation (each ``s -= …`` of the loops
    in their order: ``a - b - c`` is ``(a - b) - c``)."""
    i0, i1, i2, i3 = index
    r0, r1, r2, r3 = h[i0], h[i1], h[i2], h[i3]
    s = r0[i0]
    if not s > floor:
        return None
    l00 = math.sqrt(s)
    l10 = r1[i0] / l00
    s = r1[i1] - l10 * l10
    if not s > floor:
        return None
    l11 = math.sqrt(s)
    l20 = r2[i0] / l00
    l21 = (r2[i1] - l20 * l10) / l11
    s = r2[i2] - l20 * l20 - l21 * l21
    if not s > floor:
        return None
    l22 = math.sqrt(s)
    l30 = r3[i0] / l00
    l31 = (r3[i1] - l30 * l10) / l11
    l32 = (r3[i2] - l30 * l20 - l31 * l21) / l22
    s = r3[i3] - l30 * l30 - l31 * l31 - l32 * l32
    if not s > floor:
        return None
    l33 = math.sqrt(s)
    out = []
    for v in rhs:
        y0 = v[0] / l00
        y1 = (v[1] - l10 * y0) / l11
        y2 = (v[2] - l20 * y0 - l21 * y1) / l22
        x3 = ((v[3] - l30 * y0 - l31 * y1 - l32 * y2) / l33) / l33
        x2 = (y2 - l32 * x3) / l22
        x1 = (y1 - l21 * x2 - l31 * x3) / l11
        out.append([(y0 - l10 * x1 - l20 * x2 - l30 * x3) / l00, x1, x2, x3])
    return out


def nonneg_qp(h: Matrix, q: list[float], *, simplex: bool = False, max_iter: int | None = None,
              scale: float | None = None) -> list[float] | None:
    """argmin ½ xᵀHx + qᵀx s.t. x ≥ 0 (and Σx = 1 with ``simplex``), or None when the active-set
    method cannot vouch for its answer (a face on which H is singular, or no convergence).
    ``scale``: H's mean diagonal, ``sum(h[i][i] for i in range(n)) / n``, when the caller solves
    several problems of one H."""
    n = len(h)
    if n == 0:
        return []
    if scale is None:
        scale = sum(h[i][i] for i in range(n)) / n
    if not (scale > 0 and math.isfinite(scale)):
        return None
    floor, tol = PIVOT * scale, TOL * scale
    if simplex:
        # the face of every task first: MGDA's min-norm point is often interior to the simplex, and then
        # one system is solved instead of one per task added to the face (x > 0 there is optimal: no
        # bound is active, and the face's minimiser satisfies the equality)
        inside = _face_minimiser(h, q, list(range(n)), floor, True)
        if inside is not None and min(inside) > 0.0:
            return inside
        # start at the best vertex
        best = min(range(n), key=lambda i: 0.5 * h[i][i] + q[i])
        x = [0.0] * n
        x[best] = 1.0
        free = [best]
    else:  # start at 0
        x, free = [0.0] * n, []
    for _ in range(max_iter if max_iter is not None else 10 * n + 10):
        if free:
            # the minimiser on the current face: x_j = 0 off ``free``
            if len(free) == 1 and not simplex:  # _face_minimiser's one-index solve, written out
                a = free[0]
                pivot = h[a][a]
                if not pivot > floor:
                    return None
                root = math.sqrt(pivot)
                target = [(-q[a] / root) / root]
            else:
                target = _face_minimiser(h, q, free, floor, simplex)
                if target is None:
                    return None
            if min(target) < 0.0:  # step towards it until a coordinate reaches 0; that one leaves the face
                alpha, k_out = min((x[i] / (x[i] - t), k) for k, (i, t) in enumerate(zip(free, target)) if t < 0.0)
                for i, t in zip(free, target, strict=True):
                    x[i] += alpha * (t - x[i])
                x[free[k_out]] = 0.0
                del free[k_out]
                continue
            for i, t in zip(free, target, strict=True):
                x[i] = t
            # multipliers of the bounds x_j ≥ 0 off the face: the gradient, less the equality's multiplier.
            # x is 0 off the face, so Hx sums over the face alone (in index order: the same sums)
            if len(free) == 1:  # the sums below of one and of two terms, written out: the same floats
                i = free[0]
                xi = x[i]
                grad = [row[i] * xi + qj for row, qj in zip(h, q, strict=True)]
            elif len(free) == 2:
                i, k = sorted(free)
                xi, xk = x[i], x[k]
                grad = [row[i] * xi + row[k] * xk + qj for row, qj in zip(h, q, strict=True)]
            else:
                order = sorted(free)
                grad = [sum([row[i] * x[i] for i in order]) + qj for row, qj in zip(h, q, strict=True)]
            nu = (sum(grad[i] for i in free) / len(free)) if simplex else 0.0
        else:  # x = 0: the gradient is q
            grad, nu = q, 0.0
        worst, enter = -tol, -1
        for j in range(n):
            if grad[j] - nu < worst and x[j] == 0.0 and j not in free:
                worst, enter = grad[j] - nu, j
        if enter < 0:
            return x
        free.append(enter)
    return None


def _face_minimiser(h: Matrix, q: list[float], face: list[int], floor: float, simplex: bool) -> list[float] | None:
    """argmin ½xᵀHx + qᵀx with x = 0 off ``face`` (and Σx = 1 with ``simplex``), as values over
    ``face``; None when H_FF is singular or the equality cannot be met."""
    if simplex and not any(q[i] for i in face):  # MGDA's q = 0: the first system's solution is 0, x = b / Σb
        solved = cholesky_solve(h, face, [[1.0] * len(face)], floor)
        if solved is None:
            return None
        total_b = sum(solved[0])
        if not total_b > 0:
            return None
        mu = 1.0 / total_b
        return [mu * bi for bi in solved[0]]
    rhs = [-q[i] for i in face]
    solved = cholesky_solve(h, face, [rhs, [1.0] * len(face)] if simplex else [rhs], floor)
    if solved is None:
        return None
    if not simplex:
        return solved[0]
    a, b = solved  # x = a + μ b with Σx = 1 (the equality's multiplier μ)
    total_b = sum(b)
    if not total_b > 0:
        return None
    mu = (1.0 - sum(a)) / total_b
    return [ai + mu * bi for ai, bi in zip(a, b, strict=True)]


#: the ridge (relative to the mean diagonal) that the numpy path's first quadprog call adds
RIDGE = 1e-12


def min_norm_weights(g: Matrix) -> list[float] | None:
    """MGDA's argmin_{w ≥ 0, Σw = 1} wᵀGw for a list-of-rows Gramian (symmetrised here, scaled to
    unit mean diagonal and ridged as the numpy path does); None hands the problem back."""
    n = len(g)
    scale = sum(g[i][i] for i in range(n)) / n if n else 0.0
    if not scale > 0:  # every gradient 0 (or NaN): the numpy path's uniform answer
        return [1.0 / max(n, 1)] * n
    gs = [[(g[i][j] + g[j][i]) / (2 * scale) + (RIDGE if i == j else 0.0) for j in range(n)] for i in range(n)]
    x = nonneg_qp(gs, [0.0] * n, simplex=True)
    if x is None:
        return None
    x = [v if v > 0.0 else 0.0 for v in x]
    total = sum(x)
    return [v / total for v in x]


def dual_cone_weights(g: Matrix, u: list[float]) -> list[float] | None:
    """UPGrad's Σᵢ vᵢ with vᵢ = argmin_{v ≥ uᵢeᵢ} vᵀGv (Quinton & Rey 2024, Proposition 1): each vᵢ
    is uᵢeᵢ + y with y = argmin_{y ≥ 0} ½yᵀGy + uᵢ(Geᵢ)ᵀy. None hands the problem back."""
    n = len(g)
    scale = sum(g[i][i] for i in range(n)) / n if n else 0.0
    scale = scale if scale > 0 else 1.0
    if not math.isfinite(scale):
        return None
    gs = symmetrised([[v / scale for v in row] for row in g])
    gs_scale = sum(gs[i][i] for i in range(n)) / n if n else 0.0  # what each QP below would compute again
    total = [0.0] * n
    for i, ui in enumerate(u):
        total[i] += ui
        q = [ui * gs[k][i] for k in range(n)]
        if min(q) >= 0.0:  # uᵢgᵢ conflicts with no task gradient: its own projection
            continue
        y = nonneg_qp(gs, q, scale=gs_scale)
        if y is None:
            return None
        for k in range(n):
            total[k] += y[k]
    return total
