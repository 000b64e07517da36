"""Smooth Tchebycheff scalarization (STCH)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._weighting import EPS, PerTaskMethod
from polytask.methods.base import Step, check_positive, register


@register("stch")
class STCH(PerTaskMethod):
    """Smooth Tchebycheff scalarization — Lin, Zhang, Yang, Liu, Wang & Zhang, "Smooth Tchebycheff
    Scalarization for Multi-Objective Optimization", ICML 2024 (equal preferences).

        Total = μ log Σᵢ exp(L̃ᵢ / μ),   L̃ᵢ = Lᵢ / nᵢ

    a smooth upper bound of maxᵢ L̃ᵢ that tends to it as μ → 0. With the ideal point at 0 and
    ``warmup_epochs = 0`` the nadir is nᵢ = 1; otherwise nᵢ is the mean of task i's epoch-average
    training loss over the first ``warmup_epochs`` epochs (equal weights meanwhile); the
    authors' multi-task code also normalises by a warm-up average, but its exact transform (and
    per-step averaging) is not reproduced here. The weights are the exact gradient of Total:
    wᵢ = softmax(L̃/μ)ᵢ / nᵢ (Σ w = 1 when nᵢ = 1), detached.
    """

    needs = "losses"
    stateful = True

    def __init__(self, *, mu: float = 1.0, warmup_epochs: int = 0) -> None:
        super().__init__()
        self.mu = check_positive("stch", "mu", mu)
        if not isinstance(warmup_epochs, int) or isinstance(warmup_epochs, bool) or warmup_epochs < 0:
            raise InvalidParameterError(f"`warmup_epochs` of `stch` must be an int >= 0; found {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        self.register_buffer("loss_sum", torch.empty(0, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.empty(0, dtype=torch.long))
        self._remember(mu=mu, warmup_epochs=warmup_epochs)

    def reset_state(self, num_tasks: int) -> None:
        self.loss_sum = torch.zeros(num_tasks, dtype=torch.float64)
        self.epochs_seen = torch.zeros(num_tasks, dtype=torch.long)

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float],
                     val_metrics: Mapping[str, Mapping[str, float]] | None = None) -> None:
        if getattr(self, "all_tasks", None) is None:
            self.setup(list(train_losses))
        for i, task in enumerate(self.all_tasks):
            if task in train_losses and self.epochs_seen[i] < self.warmup_epochs:
                self.loss_sum[i] += float(train_losses[task])
                self.epochs_seen[i] += 1

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        if bool((self.epochs_seen[idx] < self.warmup_epochs).any()):
            return torch.ones_like(step.losses)
        nadir = torch.ones(len(idx), dtype=torch.float64, device=idx.device)
        if self.warmup_epochs:
            nadir = (self.loss_sum[idx] / self.warmup_epochs).clamp_min(EPS)
        return (torch.softmax(step.losses.double() / nadir / self.mu, dim=0) / nadir).to(step.losses)
