"""GradNorm: gradient normalisation for adaptive loss balancing."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._weighting import EPS, PerTaskMethod
from polytask.methods.base import Step, check_positive, register


def gradnorm_targets(norms: Tensor, weights: Tensor, losses: Tensor, initial: Tensor, alpha: float) -> Tensor:
    """GradNorm's target norms Ḡ_W · rᵢ^α, with rᵢ = L̃ᵢ / mean(L̃) and L̃ᵢ = Lᵢ / Lᵢ(0)."""
    ratios = losses / initial.clamp_min(EPS)
    return (weights * norms).mean() * (ratios / ratios.mean().clamp_min(EPS)).pow(alpha)


@register("gradnorm")
class GradNorm(PerTaskMethod):
    """GradNorm — Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
    Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018 (Algorithm 1).

    With gᵢ = ∇_W Lᵢ on the last shared layer W (``compare = "last_shared"``; ‖gᵢ‖² = Gᵢᵢ), the
    weights wᵢ descend

        L_grad = Σᵢ | wᵢ‖gᵢ‖ − Ḡ_W · rᵢ^α |,   Ḡ_W = meanᵢ wᵢ‖gᵢ‖,   rᵢ = L̃ᵢ / meanⱼ L̃ⱼ,  L̃ᵢ = Lᵢ / Lᵢ(0)

    with the target Ḡ_W rᵢ^α held constant (as in the paper), by the analytic gradient
    ∂L_grad/∂wᵢ = sign(wᵢ‖gᵢ‖ − targetᵢ) ‖gᵢ‖ and step size ``lr``, then are renormalised so
    that Σ w = T over the step's tasks. The step uses the current weights; the update applies
    from the next step. Lᵢ(0) is each task's first seen loss (a buffer).

    Departures:
        The paper trains wᵢ with the network's optimiser; here it is plain gradient descent
        owned by the method (so ``state_dict`` holds all of it).
    """

    needs = "gramian"
    compare = "last_shared"
    heads = "weighted"  # the paper's weights multiply the losses: every parameter sees Σ wᵢ ∇Lᵢ
    stateful = True

    def __init__(self, *, alpha: float = 1.5, lr: float = 0.025) -> None:
        super().__init__()
        self.alpha = check_positive("gradnorm", "alpha", alpha, allow_zero=True)
        self.lr = check_positive("gradnorm", "lr", lr)
        self.register_buffer("task_weights", torch.empty(0, dtype=torch.float64))
        self.register_buffer("initial_losses", torch.empty(0, dtype=torch.float64))
        self._remember(alpha=alpha, lr=lr)

    def reset_state(self, num_tasks: int) -> None:
        self.task_weights = torch.ones(num_tasks, dtype=torch.float64)
        self.initial_losses = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        losses = step.losses.double()
        first = torch.isnan(self.initial_losses[idx])
        self.initial_losses[idx[first]] = losses[first]
        w = self.task_weights[idx].clone()
        norms = step.gramian.diagonal().double().clamp_min(0).sqrt()
        target = gradnorm_targets(norms, w, losses, self.initial_losses[idx], self.alpha)
        grad = torch.sign(w * norms - target) * norms
        new = (w - self.lr * grad).clamp_min(EPS)
        self.task_weights[idx] = new * len(idx) / new.sum()
        return w.to(step.losses)
