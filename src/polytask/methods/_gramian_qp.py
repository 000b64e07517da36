"""Small quadratic programs on a task Gramian G = J Jᵀ, shared by the gradient methods.

Everything here works on T×T matrices only: a direction d = Jᵀw is represented by its weights w,
its norm is √(wᵀGw) and its inner products with the task gradients are Gw. Problems are solved
in float64 with `quadprog` (Goldfarb–Idnani dual active set, exact up to round-off) after
scaling G to unit mean diagonal, which leaves every solution here unchanged.
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError

#: Ridges tried in turn (relative to the mean diagonal of G) until G + ridge·I factorises.
_RIDGES = (1e-12, 1e-10, 1e-8, 1e-6, 1e-4)
NORMALISATIONS = ("none", "l2", "loss", "loss+")


def as_float64(gramian: Tensor | None, owner: str) -> Tensor:
    """The step's Gramian, symmetrised, as a float64 CPU tensor (``Method.forward`` has checked
    that it is there; ``owner`` names the method in errors)."""
    assert gramian is not None, owner
    g = gramian.detach().to(device="cpu", dtype=torch.float64)
    return (g + g.T) / 2


def _scale(g: Tensor) -> float:
    s = float(g.diagonal().mean()) if g.numel() else 0.0
    return s if s > 0 else 1.0


def _quadprog(g: Tensor, a: np.ndarray, c: np.ndarray, b: np.ndarray, meq: int) -> np.ndarray:
    """argmin ½xᵀGx − aᵀx s.t. Cᵀx ≥ b (the first ``meq`` as equalities), with a minimal ridge."""
    gn = g.numpy()
    eye = np.eye(len(gn))
    for ridge in _RIDGES:
        try:
            return quadprog.solve_qp(gn + ridge * eye, a, c, b, meq)[0]
        except ValueError:  # "matrix G is not positive definite" (round-off): retry with more ridge
            continue
    raise InvalidParameterError("the Gramian QP could not be solved; the Gramian has non-finite or huge entries")


def simplex_qp(g: Tensor) -> Tensor:
    """Min-norm point of the convex hull of the gradients: argmin_{w ≥ 0, Σw = 1} wᵀGw."""
    n = len(g)
    c = np.concatenate([np.ones((n, 1)), np.eye(n)], axis=1)
    b = np.concatenate([[1.0], np.zeros(n)])
    w = np.clip(_quadprog(g / _scale(g), np.zeros(n), c, b, 1), 0.0, None)
    return torch.from_numpy(w / w.sum())


def factor(g: Tensor) -> Tensor:
    """L (T×k), k = rank G, with L Lᵀ = G: the task gradients expressed isometrically in ℝᵏ."""
    vals, vecs = torch.linalg.eigh(g)
    keep = vals > 1e-12 * float(vals.abs().max().clamp_min(torch.finfo(g.dtype).tiny))
    return vecs[:, keep] * vals[keep].sqrt()


def project_polyhedron(f: Tensor, a: Tensor, lower: Tensor) -> tuple[Tensor, Tensor] | None:
    """argmin_x ½‖x − a‖² s.t. Fx ≥ lower, and its multipliers λ ≥ 0 (x = a + Fᵀλ); None if empty.

    ``f`` is a factor of G (:func:`factor`); the Hessian is the identity, so quadprog needs no
    ridge even when G is singular.
    """
    if f.shape[1] == 0:
        return (a, torch.zeros(len(f), dtype=f.dtype)) if bool((lower <= 0).all()) else None
    try:
        x, _, _, _, lam, _ = quadprog.solve_qp(np.eye(f.shape[1]), a.numpy(), f.T.numpy(), lower.numpy(), 0)
    except ValueError:  # "constraints are inconsistent, no solution"
        return None
    return torch.from_numpy(x), torch.from_numpy(np.clip(lam, 0.0, None))


def project_dual_cone(g: Tensor, u: Tensor) -> Tensor:
    """Weights of the projection of Jᵀu onto the dual cone {x : Jx ≥ 0}, for each row u of ``u``.

    By Proposition 1 of Quinton & Rey (2024), π(Jᵀu) = Jᵀv with v = argmin_{v ≥ u} vᵀGv; here
    the primal projection is solved in the rank-k factor of G and v = u + λ (its multipliers).
    ``u`` is (T,) or (K, T); the result has the same shape.
    """
    n = len(g)
    gs = g / _scale(g)
    f = factor(gs)
    rows = u.reshape(-1, n).to(torch.float64)
    zero = torch.zeros(n, dtype=torch.float64)
    out = []
    for row in rows:
        sol = project_polyhedron(f, f.T @ row, zero)
        if sol is None:  # quadprog gives up on degenerate cones (e.g. {0}): solve the ridged dual
            v = torch.from_numpy(_quadprog(gs, np.zeros(n), np.eye(n), row.numpy(), 0))
            out.append(torch.maximum(v, row))
        else:
            out.append(row + sol[1])
    return torch.stack(out).reshape(u.shape)


def normalisers(g: Tensor, losses: Tensor, mode: str) -> Tensor:
    """Per-task gradient scale nᵢ of Sener & Koltun's normalisations (their code, as in LibMTL).

    ``none``: 1; ``l2``: ‖gᵢ‖; ``loss``: Lᵢ; ``loss+``: Lᵢ‖gᵢ‖. The normalised Gramian is
    G / (n nᵀ); weights found on it apply to gᵢ / nᵢ, i.e. wᵢ / nᵢ on the raw gradients.
    """
    norms = g.diagonal().clamp_min(0).sqrt()
    loss = losses.detach().to(device="cpu", dtype=torch.float64).abs()
    n = {"none": torch.ones_like(norms), "l2": norms, "loss": loss, "loss+": loss * norms}[mode]
    tiny = torch.finfo(torch.float64).tiny ** 0.5
    return torch.where(n > tiny, n, torch.ones_like(n))


def check_choice(owner: str, name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidParameterError(f"`{name}` of `{owner}` must be one of {', '.join(choices)}; found {value!r}")
    return value  # type: ignore[return-value]


def to_step(w: Tensor, like: Tensor) -> Tensor:
    """Weights back in the dtype and on the device of the step's Gramian."""
    return w.to(dtype=like.dtype, device=like.device)
