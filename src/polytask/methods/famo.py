"""FAMO: fast adaptive multitask optimisation, O(1) per step."""

from __future__ import annotations

import math
from array import array

import torch
from torch import Tensor

from polytask.methods._host import host_weights
from polytask.methods._weighting import ADAM_EPS, BETAS, EPS, PerTaskMethod, as_weights
from polytask.methods.base import HostUpdate, Step, check_positive, register


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
    tasks active in two consecutive steps update their logits. Losses are floored at 1e-8. A NaN or
    infinite loss leaves the state as it was (that step's weights are NaN, or 0 for an infinite loss,
    as the formula gives; its gradient is not finite anyway), where it made every logit NaN for good. The
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
        return as_weights(self._advance(step), step)

    def host_update(self, step: Step) -> HostUpdate:
        """:meth:`weights` with their values as floats (the engine reads nothing back)."""
        tensor, values = host_weights(self._advance(step), step.losses)
        return HostUpdate(tensor, values=values)

    def _advance(self, step: Step) -> list[float]:
        """The logits' step from the last losses to these, then this step's weights as floats.

        The state is read and written as one flat sequence of the five host buffers' rows (logits,
        exp_avg, exp_avg_sq, adam_steps, previous_losses): the packed table's memory itself where the
        buffers are packed, element by element (Why: FAMO's cost is its Python, and inside a small
        model's step each call and each list made costs several times what it does in a loop of its
        own; ``polytask bench small``)."""
        rows = self.positions(step)
        n = len(self.all_tasks)
        packed = self._packed()
        state = packed[0] if packed is not None else [x for row in self.host_values() for x in row]
        a, q, c, p = n, 2 * n, 3 * n, 4 * n  # where exp_avg, exp_avg_sq, adam_steps, previous_losses start
        losses = [max(x, EPS) for x in step.losses.tolist()]
        log, exp = math.log, math.exp
        # (row, δ) of the tasks active in the last step too: δ = log L(before) − log L(now)
        # a NaN or infinite loss moves no logit and is not kept as "before" (NaN is kept: the next step's δ
        # of that task is skipped too); it would make every logit NaN from then on
        finite = math.isfinite
        moved = [(r, log(state[p + r]) - log(x)) for r, x in zip(rows, losses, strict=True)
                 if not math.isnan(state[p + r]) and finite(x)]
        if moved:
            top = max(state[r] for r, _ in moved)
            e = [exp(state[r] - top) for r, _ in moved]
            total = sum(e)
            mean = sum(ei / total * d for ei, (_, d) in zip(e, moved, strict=True))
            lr, decay = self.lr, self.weight_decay
            for ei, (r, d) in zip(e, moved, strict=True):
                # ∂(zᵀδ)/∂ξᵣ = zᵣ(δᵣ − zᵀδ), then adam_step's arithmetic in its order (see it)
                grad = ei / total * (d - mean) + decay * state[r]
                m = state[a + r] = BETAS[0] * state[a + r] + (1 - BETAS[0]) * grad
                v = state[q + r] = BETAS[1] * state[q + r] + (1 - BETAS[1]) * grad * grad
                k = state[c + r] = state[c + r] + 1
                state[r] -= lr * (m / (1 - BETAS[0] ** k)) / ((v / (1 - BETAS[1] ** k)) ** 0.5 + ADAM_EPS)
        if len(rows) != n:  # only tasks active in consecutive steps update their logits
            state[p:p + n] = array(packed[1], [math.nan]) * n if packed is not None else [math.nan] * n
        for r, x in zip(rows, losses, strict=True):
            state[p + r] = x if finite(x) else math.nan
        if packed is None:
            self.store_host_values([state[k:k + n] for k in range(0, 5 * n, n)])
        top = max(state[r] for r in rows)
        e = [exp(state[r] - top) for r in rows]
        total = sum(e)
        scaled = [ei / total / x for ei, x in zip(e, losses, strict=True)]
        total = sum(scaled)
        return [x / total for x in scaled]
