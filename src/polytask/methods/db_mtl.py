"""DB-MTL: dual balancing of loss scales and gradient magnitudes."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._weighting import EPS, PerTaskMethod
from polytask.methods.base import Step, check_positive, register


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

    ``beta_sigma`` (σ, LibMTL's ``DB_beta_sigma``, default 0) decays the average's coefficient with
    the step count kᵢ of each task, βₖ = β / kᵢ^σ, as the authors' code does; σ = 0 is a constant β.
    """

    needs = "gramian"
    stateful = True

    def __init__(self, *, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta < 1):
            raise InvalidParameterError(f"`beta` of `db_mtl` must be in [0, 1); found {beta!r}")
        self.beta = float(beta)
        self.beta_sigma = check_positive("db_mtl", "beta_sigma", beta_sigma, allow_zero=True)
        self.register_buffer("norms", torch.empty(0, dtype=torch.float64))
        if self.beta_sigma > 0:  # each task's step count; absent by default, so older states still load
            self.register_buffer("counts", torch.empty(0, dtype=torch.long))
            self._remember(beta=beta, beta_sigma=beta_sigma)
        else:
            self._remember(beta=beta)

    def reset_state(self, num_tasks: int) -> None:
        self.norms = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        if self.beta_sigma > 0:
            self.counts = torch.zeros(num_tasks, dtype=torch.long)

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        losses = step.losses.double().clamp_min(EPS)
        current = step.gramian.diagonal().double().clamp_min(0).sqrt() / losses
        old = self.norms[idx]
        beta: float | Tensor = self.beta
        if self.beta_sigma > 0:
            self.counts[idx] += 1
            beta = self.beta / self.counts[idx].double() ** self.beta_sigma
        ema = torch.where(torch.isnan(old), current, beta * old + (1 - beta) * current)
        self.norms[idx] = ema
        return (ema.max() / (ema.clamp_min(EPS) * losses)).to(step.losses)
