"""Dynamic Weight Average (DWA)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from polytask.methods._weighting import EPS, PerTaskMethod, as_weights, softmax
from polytask.methods.base import Step, check_positive, register


@register("dwa")
class DWA(PerTaskMethod):
    """Dynamic Weight Average — Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019 (the MTAN paper).

        wᵢ(t) = T · exp(rᵢ(t−1)/τ) / Σⱼ exp(rⱼ(t−1)/τ),   rᵢ(t−1) = Lᵢ(t−1) / Lᵢ(t−2)

    with Lᵢ(t) the average training loss of task i over epoch t (from ``on_epoch_end``) and τ the
    ``temperature``. A task with fewer than two finished epochs has weight 1 (the paper's
    wᵢ(1) = wᵢ(2) = 1); the softmax runs over the active tasks that do have a rate, scaled by
    their number, so Σ w = T always.
    """

    needs = "losses"
    stateful = True
    host_buffers = ("history", "epochs_seen")

    def __init__(self, *, temperature: float = 2.0) -> None:
        super().__init__()
        self.temperature = check_positive("dwa", "temperature", temperature)
        self.register_buffer("history", torch.empty(2, 0, dtype=torch.float64))  # rows: L(t−2), L(t−1)
        self.register_buffer("epochs_seen", torch.empty(0, dtype=torch.long))
        self._remember(temperature=temperature)

    def reset_state(self, num_tasks: int) -> None:
        self.history = torch.ones(2, num_tasks, dtype=torch.float64)
        self.epochs_seen = torch.zeros(num_tasks, dtype=torch.long)

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float],
                     val_metrics: Mapping[str, Mapping[str, float]] | None = None) -> None:
        if getattr(self, "all_tasks", None) is None:
            self.setup(list(train_losses))
        for i, task in enumerate(self.all_tasks):
            if task in train_losses:
                self.history[0, i] = self.history[1, i]
                self.history[1, i] = float(train_losses[task])
                self.epochs_seen[i] += 1

    def weights_key(self, tasks: tuple[str, ...]) -> tuple[object, ...]:
        """The weights are a function of the epoch means and counts (which change at ``on_epoch_end``,
        with a loaded state or a new setup), τ and the task list: the key is their values."""
        (older, newer), seen = self.host_values()
        return (tuple(older), tuple(newer), tuple(seen), self.temperature, getattr(self, "all_tasks", None))

    def weights(self, step: Step) -> Tensor:
        rows = self.positions(step)  # T numbers: host arithmetic (see PerTaskMethod)
        (older, newer), seen = self.host_values()
        ready = [k for k, r in enumerate(rows) if seen[r] >= 2]
        if not ready:
            return torch.ones_like(step.losses)
        rates = [newer[rows[k]] / max(older[rows[k]], EPS) / self.temperature for k in ready]
        w = [1.0] * len(rows)
        for k, value in zip(ready, softmax(rates), strict=True):
            w[k] = len(ready) * value
        return as_weights(w, step)
