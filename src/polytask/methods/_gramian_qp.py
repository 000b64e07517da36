"""Small quadratic programs on a task Gramian G = J Jᵀ, shared by the gradient methods.

Everything here works on T×T matrices only: a direction d = Jᵀw is represented by its weights w,
its norm is √(wᵀGw) and its inner products with the task gradients are Gw. Problems are solved
in float64 with `quadprog` (Goldfarb–Idnani dual active set, exact up to round-off) after
scaling G to unit mean diagonal, which leaves every solution here unchanged.

The arithmetic on these T×T matrices is numpy's: the tensors passed in and out are float64 CPU
tensors, shared with numpy arrays without a copy. A torch operation costs a few microseconds of
dispatch whatever its size, a numpy one about a tenth of that, and a method's step here is tens of
them, which on a small model (a few hundred microseconds per step) was most of the step.

Up to :data:`._small_qp.SMALL_T` tasks MGDA, UPGrad, CAGrad and Nash-MTL do not come here at all
(unless :mod:`._small_qp` hands a problem back): timed inside a training step rather than in a
loop of its own, a numpy, LAPACK or quadprog call costs 8–10 times as much (its code and data are
no longer in the caches after the backward passes), and plain Python floats are then the faster.
"""

from __future__ import annotations

import functools

import numpy as np
import quadprog
import torch
from scipy.linalg.lapack import dsyevd as _dsyevd
from torch import Tensor

from polytask.core.errors import InvalidParameterError

#: Ridges tried in turn (relative to the mean diagonal of G) until G + ridge·I factorises.
_RIDGES = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4)
NORMALISATIONS = ("none", "l2", "loss", "loss+")


def as_float64(gramian: Tensor | None, owner: str) -> Tensor:
    """The step's Gramian, symmetrised, as a float64 CPU tensor (``Method.forward`` has checked
    that it is there; ``owner`` names the method in errors)."""
    assert gramian is not None, owner
    # torch's operations, not numpy's: inside a training step (between backward passes) the numpy
    # cast and ufuncs cost ~80 µs on a 4×4 Gramian against ~9 µs for these, though numpy is the faster
    # in a loop of its own (`polytask bench small`; the same values, bit for bit)
    g = gramian.detach().to(device="cpu", dtype=torch.float64)
    return (g + g.T) / 2


def _scale_np(g: np.ndarray) -> float:
    s = float(np.trace(g)) / len(g) if g.size else 0.0
    return s if s > 0 else 1.0


def _scale(g: Tensor) -> float:
    return _scale_np(g.numpy())


@functools.cache
def _eye(n: int) -> np.ndarray:
    """The n×n identity, made once per size (quadprog copies its inputs, so it is never written;
    it cannot be marked read-only: quadprog's signature takes writable buffers)."""
    return np.eye(n)


@functools.cache
def _simplex_constraints(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """quadprog's (C, b, a) of the simplex {Σw = 1, w ≥ 0} for n tasks (Cᵀw ≥ b, the first an equality)."""
    return np.concatenate([np.ones((n, 1)), np.eye(n)], axis=1), np.concatenate([[1.0], np.zeros(n)]), np.zeros(n)


def _quadprog_np(g: np.ndarray, a: np.ndarray, c: np.ndarray, b: np.ndarray, meq: int) -> np.ndarray:
    eye = _eye(len(g))
    for ridge in _RIDGES:
        try:
            return quadprog.solve_qp(g + ridge * eye, a, c, b, meq)[0]
        except ValueError:  # "matrix G is not positive definite" (round-off): retry with more ridge
            continue
    raise InvalidParameterError("the Gramian QP could not be solved; the Gramian has non-finite or huge entries")


def _quadprog(g: Tensor, a: np.ndarray, c: np.ndarray, b: np.ndarray, meq: int) -> np.ndarray:
    """argmin ½xᵀGx − aᵀx s.t. Cᵀx ≥ b (the first ``meq`` as equalities), with a minimal ridge."""
    return _quadprog_np(g.numpy(), a, c, b, meq)


def simplex_qp_np(g: np.ndarray, *, scaled: bool = False) -> np.ndarray:
    """:func:`simplex_qp` on a float64 array (``scaled``: G already has unit mean diagonal)."""
    c, b, a = _simplex_constraints(len(g))
    w = np.maximum(_quadprog_np(g if scaled else g / _scale_np(g), a, c, b, 1), 0.0)
    return w / w.sum()


def simplex_qp(g: Tensor) -> Tensor:
    """Min-norm point of the convex hull of the gradients: argmin_{w ≥ 0, Σw = 1} wᵀGw."""
    return torch.from_numpy(simplex_qp_np(g.numpy()))


_TINY = float(np.finfo(np.float64).tiny)


def eigh_np(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric float64 matrix: LAPACK's dsyevd
    called directly (as ``numpy.linalg.eigh`` does, from the lower triangle), without numpy's
    checks and wrapping, which on a T×T Gramian cost twice the decomposition."""
    if g.dtype == np.float64 and g.ndim == 2 and g.size:
        vals, vecs, info = _dsyevd(g, lower=1)
        if info == 0:
            return vals, vecs
    return np.linalg.eigh(g)


def factor_np(g: np.ndarray) -> np.ndarray:
    """:func:`factor` on a float64 array."""
    vals, vecs = eigh_np(g)
    keep = vals > 1e-12 * max(float(np.abs(vals).max()) if vals.size else 0.0, _TINY)
    return vecs[:, keep] * np.sqrt(vals[keep])


def factor(g: Tensor) -> Tensor:
    """L (T×k), k = rank G, with L Lᵀ = G: the task gradients expressed isometrically in ℝᵏ."""
    return torch.from_numpy(factor_np(g.numpy()))


def project_polyhedron_np(f: np.ndarray, a: np.ndarray, lower: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """:func:`project_polyhedron` on float64 arrays."""
    if f.shape[1] == 0:
        return (a, np.zeros(len(f))) if bool((lower <= 0).all()) else None
    try:
        x, _, _, _, lam, _ = quadprog.solve_qp(_eye(f.shape[1]), a, f.T, lower, 0)
    except ValueError:  # "constraints are inconsistent, no solution"
        return None
    return x, np.maximum(lam, 0.0)  # the ufunc: np.clip's Python wrapper costs more than the 4-vector


def project_polyhedron(f: Tensor, a: Tensor, lower: Tensor) -> tuple[Tensor, Tensor] | None:
    """argmin_x ½‖x − a‖² s.t. Fx ≥ lower, and its multipliers λ ≥ 0 (x = a + Fᵀλ); None if empty.

    ``f`` is a factor of G (:func:`factor`); the Hessian is the identity, so quadprog needs no
    ridge even when G is singular.
    """
    sol = project_polyhedron_np(f.numpy(), a.numpy(), lower.numpy())
    return None if sol is None else (torch.from_numpy(sol[0]), torch.from_numpy(sol[1]))


def project_dual_cone(g: Tensor, u: Tensor) -> Tensor:
    """Weights of the projection of Jᵀu onto the dual cone {x : Jx ≥ 0}, for each row u of ``u``.

    By Proposition 1 of Quinton & Rey (2024), π(Jᵀu) = Jᵀv with v = argmin_{v ≥ u} vᵀGv; here
    the primal projection is solved in the rank-k factor of G and v = u + λ (its multipliers).
    ``u`` is (T,) or (K, T); the result has the same shape.
    """
    n = len(g)
    out = project_dual_cone_np(g.numpy(), u.reshape(-1, n).to(torch.float64).numpy())
    return torch.from_numpy(out).reshape(u.shape)


def project_dual_cone_np(g: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """:func:`project_dual_cone` on float64 arrays, ``rows`` (K, T)."""
    n = len(g)
    gs = g / _scale_np(g)
    f = factor_np(gs)
    zero = np.zeros(n)
    out = np.empty_like(rows)
    targets = rows @ f  # row k: the point Jᵀuₖ to project, in the factor's coordinates
    # Jᵀuₖ that conflicts with no task gradient (J Jᵀuₖ ≥ 0) is its own projection: no QP
    inside = ((targets @ f.T) >= 0).all(axis=1) if f.shape[1] else np.zeros(len(rows), dtype=bool)
    for k, row in enumerate(rows):
        if inside[k]:
            out[k] = row
            continue
        sol = project_polyhedron_np(f, targets[k], zero)
        if sol is None:  # quadprog gives up on degenerate cones (e.g. {0}): solve the ridged dual
            out[k] = np.maximum(_quadprog_np(gs, np.zeros(n), _eye(n), row, 0), row)
        else:
            out[k] = row + sol[1]
    return out


def normalisers(g: Tensor, losses: Tensor, mode: str) -> Tensor:
    """Per-task gradient scale nᵢ of Sener & Koltun's normalisations (their code, as in LibMTL).

    ``none``: 1; ``l2``: ‖gᵢ‖; ``loss``: Lᵢ; ``loss+``: Lᵢ‖gᵢ‖. The normalised Gramian is
    G / (n nᵀ); weights found on it apply to gᵢ / nᵢ, i.e. wᵢ / nᵢ on the raw gradients.
    """
    if mode == "none":
        return torch.ones(len(g), dtype=torch.float64)
    norms = np.sqrt(np.clip(np.diagonal(g.numpy()), 0.0, None))
    loss = np.abs(losses.detach().to(device="cpu", dtype=torch.float64).numpy()) if mode != "l2" else norms
    n = {"l2": norms, "loss": loss, "loss+": loss * norms}[mode]
    tiny = np.finfo(np.float64).tiny ** 0.5
    return torch.from_numpy(np.where(n > tiny, n, 1.0))


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidParameterError(f"`{name}` of `{owner}` must be one of {', '.join(choices)}; found {value!r}")
    return value  # type: ignore[return-value]


def to_step(w: Tensor, like: Tensor) -> Tensor:
    """Weights back in the dtype and on the device of the step's Gramian."""
    return w.to(dtype=like.dtype, device=like.device)
