"""Euclidean projection onto the probability simplex (shared by simplex-constrained methods)."""

from __future__ import annotations

import torch
from torch import Tensor


def project_simplex(v: Tensor) -> Tensor:
    """argmin_{x ≥ 0, Σx = 1} ‖x − v‖₂ by the sort-and-threshold rule (Held et al., 1974)."""
    u, _ = torch.sort(v, descending=True)
    css = torch.cumsum(u, dim=0) - 1
    k = torch.arange(1, len(v) + 1, dtype=v.dtype, device=v.device)
    rho = int(torch.nonzero(u - css / k > 0)[-1])
    return torch.clamp(v - css[rho] / (rho + 1), min=0)
