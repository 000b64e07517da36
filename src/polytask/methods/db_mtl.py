"""DB-MTL: dual balancing of loss scales and gradient magnitudes."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._weighting import EPS, PerTaskMethod
from polytask.methods.base import Step, register


@register("db_mtl")
class DBMTL(PerTaskMethod):
    """DB-MTL — Lin, Jiang, Ye, Zhang, Chen, Chen, Liu & Kwok, "Dual-Balancing for Multi-Task
    Learning", arXiv:2308.12029, 2023.

    Loss-scale balancing trains on log Lᵢ, whose gradient is ĝᵢ = ∇Lᵢ / Lᵢ with norm
    ‖ĝᵢ‖ = sqrt(Gᵢᵢ) / Lᵢ. Gradient-magnitude balancing rescales every task to the largest norm:

        d = maxⱼ nⱼ · Σᵢ ĝᵢ / nᵢ,   nᵢ ← β nᵢ + (1 − β) ‖ĝᵢ‖   (nᵢ starts at the first ‖ĝᵢ‖)

    i.e. wᵢ = maxⱼ nⱼ / (nᵢ Lᵢ) on ∇Lᵢ. The paper keeps an exponential moving average of the
    gradient *vectors* ĝᵢ; from the Gramian only their norms are available, so the average here is
    over norms and the direction is the current one. With ``beta = 0`` this is the paper's update
    exactly. Losses are floored at 1e-8 inside the log, as in the authors' code.
    """

    needs = "gramian"
    stateful = True

    def __init__(self, *, beta: float = 0.9) -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta < 1):
            raise InvalidParameterError(f"`beta` of `db_mtl` must be in [0, 1); found {beta!r}")
        self.beta = float(beta)
        self.register_buffer("norms", torch.empty(0, dtype=torch.float64))
        self._remember(beta=beta)

    def reset_state(self, num_tasks: int) -> None:
        self.norms = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        losses = step.losses.double().clamp_min(EPS)
        current = step.gramian.diagonal().double().clamp_min(0).sqrt() / losses
        old = self.norms[idx]
        ema = torch.where(torch.isnan(old), current, self.beta * old + (1 - self.beta) * current)
        self.norms[idx] = ema
        return (ema.max() / (ema.clamp_min(EPS) * losses)).to(step.losses)
