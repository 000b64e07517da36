"""FAMO: fast adaptive multitask optimisation, O(1) per step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from polytask.methods._weighting import EPS, PerTaskMethod, adam_step, as_weights, softmax
from polytask.methods.base import Step, check_positive, register


@register("famo")
class FAMO(PerTaskMethod):
    """FAMO — Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization",
    NeurIPS 2023 (Algorithm 1).

    Task logits ξ (a buffer, initialised to 0) give z = softmax(ξ); the model descends
    Σᵢ zᵢ log Lᵢ / c with c = Σⱼ zⱼ / Lⱼ, i.e. the weights on ∇Lᵢ are

        wᵢ = (zᵢ / Lᵢ) / Σⱼ (zⱼ / Lⱼ)          (Σ w = 1, the paper's normalisation)

    so every task's log-loss decreases at the same rate. The logits then step along
    ∂(zᵀδ)/∂ξ = z ⊙ (δ − zᵀδ) with δᵢ = log Lᵢ(before) − log Lᵢ(after), using Adam with
    learning rate ``lr`` and L2 ``weight_decay`` γ, as the authors' code does.

    Deviation: the paper (and its code) re-evaluates the losses on the *same* batch after the
    model update. The engine has no second forward pass, so "after" is the next step's losses (a
    different batch): δ includes batch-to-batch noise, and the logit update lags one step. Only
    tasks active in two consecutive steps update their logits. Losses are floored at 1e-8. The
    state is kept on the host and the arithmetic on its T numbers in Python floats (float64), whatever
    the model's device.
    """

    needs = "losses"
    stateful = True
    host_buffers = ("logits", "exp_avg", "exp_avg_sq", "adam_steps", "previous_losses")

    def __init__(self, *, lr: float = 0.025, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.lr = check_positive("famo", "lr", lr)
        self.weight_decay = check_positive("famo", "weight_decay", weight_decay, allow_zero=True)
        for name in self.host_buffers:
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        self._remember(lr=lr, weight_decay=weight_decay)

    def reset_state(self, num_tasks: int) -> None:
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps"):
            setattr(self, name, torch.zeros(num_tasks, dtype=torch.float64))
        self.previous_losses = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def weights(self, step: Step) -> Tensor:
        rows = self.positions(step)
        losses = [max(x, EPS) for x in step.losses.tolist()]
        logits, exp_avg, exp_avg_sq, count, previous = self.host_values()
        # (row, δ) of the tasks active in the last step too: δ = log L(before) − log L(now)
        moved = [(r, math.log(previous[r]) - math.log(x)) for r, x in zip(rows, losses, strict=True)
                 if not math.isnan(previous[r])]
        if moved:
            z = softmax([logits[r] for r, _ in moved])
            mean = sum(zi * d for zi, (_, d) in zip(z, moved, strict=True))
            lr, decay = self.lr, self.weight_decay
            for zi, (r, d) in zip(z, moved, strict=True):  # ∂(zᵀδ)/∂ξᵣ = zᵣ(δᵣ − zᵀδ)
                logits[r], exp_avg[r], exp_avg_sq[r], count[r] = adam_step(
                    logits[r], zi * (d - mean), exp_avg[r], exp_avg_sq[r], count[r], lr=lr, weight_decay=decay)
        if len(rows) != len(previous):
            previous = [math.nan] * len(previous)  # only tasks active in consecutive steps update their logits
        for r, value in zip(rows, losses, strict=True):
            previous[r] = value
        self.store_host_values((logits, exp_avg, exp_avg_sq, count, previous))
        scaled = [zi / li for zi, li in zip(softmax([logits[r] for r in rows]), losses, strict=True)]
        total = sum(scaled)
        return as_weights([x / total for x in scaled], step)
