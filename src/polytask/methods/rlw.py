"""Random Loss Weighting (RLW)."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._weighting import PerTaskMethod, as_weights, softmax
from polytask.methods.base import Step, register


@register("rlw")
class RLW(PerTaskMethod):
    """Random Loss Weighting — Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.

        w = T · softmax(z),   z ~ N(0, I_T) drawn afresh every step

    (the paper's normal-distribution variant, scaled so that Σ w = T like equal weighting).
    Every step draws one zⱼ per task of ``setup`` (in that order) from ``step.generator`` (seeded,
    identical on every rank; torch's global generator when the step carries none) and keeps the
    active tasks', so a task's draw does not depend on the order or subset of the step's tasks.
    """

    needs = "losses"
    stateful = True  # a random draw per step

    def __init__(self) -> None:
        super().__init__()
        self._remember()

    def weights(self, step: Step) -> Tensor:
        z = torch.randn(len(self.all_tasks), generator=step.generator, dtype=torch.float64).tolist()
        active = [z[r] for r in self.positions(step)]  # T numbers: host arithmetic (see PerTaskMethod)
        return as_weights([len(active) * w for w in softmax(active)], step)
