"""Per-task gradients of the shared parameters (the Jacobian J) and their Gramian G = J Jᵀ."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def task_jacobian(losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
    """J (T×P): row i is ∇ Lᵢ w.r.t. ``inputs``, flattened and concatenated.

    A per-task loop with ``retain_graph``: on CPU it beats a vmapped batched backward and keeps
    peak memory at one gradient plus J (measured on the issue's MLP, T=40: 665 vs 820 ms).
    Inputs that a task does not reach get zeros.
    """
    rows = []
    for loss in losses:
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([
            (g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, inputs, strict=True)
        ]))
    return torch.stack(rows)


def gramian(jacobian: Tensor) -> Tensor:
    """G = J Jᵀ, symmetrised to remove float asymmetry."""
    g = jacobian @ jacobian.T
    return (g + g.T) / 2
