"""Euclidean projection onto the probability simplex (shared by simplex-constrained methods)."""

from __future__ import annotations

import torch
from torch import Tensor


def project_simplex(v: Tensor) -> Tensor:
    """argmin_{x ≥ 0, Σx = 1} ‖x − v‖₂ by the sort-and-threshold rule (Held et al., 1974).

    The projection does not change when a constant is added to every entry, so v is first shifted
    to max v = 0: the largest entry then always passes the threshold test, which in floating point
    it would not for entries so large that ``v₁ − 1`` rounds to ``v₁`` (MoCo's λ − γGλ when the
    gradients are ~1e12).
    """
    shifted = v - v.max()
    u, _ = torch.sort(shifted, descending=True)
    css = torch.cumsum(u, dim=0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - css / k > 0)[-1])
    return torch.clamp(shifted - css[rho] / (rho + 1), min=0)
