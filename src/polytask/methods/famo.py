"""FAMO: fast adaptive multitask optimisation, O(1) per step."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._weighting import EPS, PerTaskMethod, adam_step
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
    tasks active in two consecutive steps update their logits. Losses are floored at 1e-8.
    """

    needs = "losses"
    stateful = True

    def __init__(self, *, lr: float = 0.025, weight_decay: float = 0.01) -> None:
        super().__init__()
        self.lr = check_positive("famo", "lr", lr)
        self.weight_decay = check_positive("famo", "weight_decay", weight_decay, allow_zero=True)
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps", "previous_losses"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        self._remember(lr=lr, weight_decay=weight_decay)

    def reset_state(self, num_tasks: int) -> None:
        for name in ("logits", "exp_avg", "exp_avg_sq", "adam_steps"):
            setattr(self, name, torch.zeros(num_tasks, dtype=torch.float64))
        self.previous_losses = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        full = self.all_active(step)  # every task, in order: whole buffers instead of gathered rows
        losses = step.losses.double().clamp_min(EPS)
        previous = self.previous_losses if full else self.previous_losses[idx]
        pending = ~torch.isnan(previous)
        state = (self.logits, self.exp_avg, self.exp_avg_sq, self.adam_steps)
        if full and bool(pending.all()):  # the same operations as below on rows = all tasks
            delta = previous.log() - losses.log()
            z = torch.softmax(self.logits, dim=0)
            grad = z * (delta - (z * delta).sum())
            new = adam_step(self.logits, grad, self.exp_avg, self.exp_avg_sq, self.adam_steps, lr=self.lr,
                            weight_decay=self.weight_decay)
            for buffer, value in zip(state, new, strict=True):
                buffer.copy_(value)
        elif bool(pending.any()):
            rows = idx[pending]
            delta = previous[pending].log() - losses[pending].log()
            z = torch.softmax(self.logits[rows], dim=0)
            grad = z * (delta - (z * delta).sum())
            new = adam_step(self.logits[rows], grad, self.exp_avg[rows], self.exp_avg_sq[rows],
                            self.adam_steps[rows], lr=self.lr, weight_decay=self.weight_decay)
            for buffer, value in zip(state, new, strict=True):
                buffer[rows] = value
        if full:
            self.previous_losses.copy_(losses)
        else:
            self.previous_losses.fill_(float("nan"))
            self.previous_losses[idx] = losses
        scaled = torch.softmax(self.rows(self.logits, step), dim=0) / losses
        return (scaled / scaled.sum()).to(step.losses)
