"""IMTL-L: learnable loss scales from impartial multi-task learning."""

from __future__ import annotations

import torch
from torch import nn

from polytask.methods._weighting import PerTaskMethod
from polytask.methods.base import Step, Update, register


@register("imtl_l")
class IMTLL(PerTaskMethod):
    """IMTL-L — Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021 (the loss-balance part).

    Each task has a learnable scale parameter sᵢ (``nn.Parameter``, initialised to 0) and the
    scaled loss e^(sᵢ) Lᵢ − sᵢ. At the optimum in sᵢ, e^(sᵢ) Lᵢ = 1: every scaled loss is kept
    at the same value. The update's weights are the differentiable e^(sᵢ), its penalty −Σ sᵢ.
    """

    needs = "losses"
    stateful = True  # learnable scales

    def __init__(self) -> None:
        super().__init__()
        self.log_scales = nn.Parameter(torch.empty(0))
        self._remember()

    def reset_state(self, num_tasks: int) -> None:
        self.log_scales.data = torch.zeros(num_tasks)

    def update(self, step: Step) -> Update:
        scales = self.log_scales[self.index(step)]
        return Update(torch.exp(scales).to(step.losses.dtype), penalty=-scales.sum().to(step.losses.dtype))
