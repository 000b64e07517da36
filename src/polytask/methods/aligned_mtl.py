"""Aligned-MTL: align the task gradients into an orthogonal system of equal magnitudes."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods.base import Method, Step, register

SCALES = ("min", "median", "rmse")


@register("aligned_mtl")
class AlignedMTL(Method):
    """Aligned-MTL — Senushkin, Patakin, Kuznetsov & Konushin, "Independent Component Alignment
    for Multi-Task Learning", CVPR 2023 (Algorithm 1).

    With G = J Jᵀ = V Λ Vᵀ (eigenvalues λ₁ ≥ … ≥ λ_r > 0 kept up to numerical rank r), the
    balance transformation B = √λ_r · V Λ^(−1/2) Vᵀ aligns the gradients: the rows of B J are
    orthogonal with equal norms √λ_r (B G B = λ_r V Vᵀ), i.e. the aligned system has all singular
    values equal to the smallest one (the paper's scale). The update is d = Σᵢ (B J)ᵢ, so
    w = B 1 — the official implementation's sum over tasks. ``scale`` picks the singular value
    the aligned system takes: ``"min"`` (the paper), ``"median"``, or ``"rmse"`` (the mean
    eigenvalue, an option of the official code). Run it in features mode for Aligned-MTL-UB.
    """

    needs = "gramian"

    def __init__(self, *, scale: Literal["min", "median", "rmse"] = "min") -> None:
        super().__init__()
        if scale not in SCALES:
            raise InvalidParameterError(f"`scale` of `AlignedMTL` must be one of {SCALES}; found {scale!r}")
        self.scale = scale
        self._remember(scale=scale)

    def weights(self, step: Step) -> Tensor:
        return balance_transformation(step.gramian, self.scale).sum(dim=1)


def balance_transformation(gramian: Tensor, scale: str = "min") -> Tensor:
    """B = √s · V Λ^(−1/2) Vᵀ on the numerical range of G (identity when G is zero)."""
    g = gramian.double()
    lam, vec = torch.linalg.eigh(g)
    tol = lam.max().clamp(min=0) * len(g) * torch.finfo(gramian.dtype).eps
    keep = lam > tol
    if not keep.any():
        return torch.eye(len(g), dtype=gramian.dtype, device=gramian.device)
    lam, vec = lam[keep], vec[:, keep]
    s = {"min": lam.min(), "median": lam.median(), "rmse": lam.mean()}[scale]
    return (s.sqrt() * (vec / lam.sqrt()) @ vec.T).to(gramian.dtype)
