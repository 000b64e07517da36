"""ExcessMTL: task weights driven by estimated excess risks (distance to each task's optimum)."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._lazy_state import LazyStateMixin
from polytask.methods._weighting import PerTaskMethod
from polytask.methods.base import Step, check_positive, register

#: AdaGrad's floor under the accumulated squared gradients (the authors', LibMTL's and TorchJD's 1e-7)
_ADAGRAD_EPS = 1e-7


@register("excess_mtl")
class ExcessMTL(LazyStateMixin, PerTaskMethod):
    """ExcessMTL — He et al., "Robust Multi-Task Learning with Excess Risks",
    ICML 2024 (Algorithm 1, Eq. 6-9).

    Each task's excess risk Lᵢ(θ) − Lᵢ(θᵢ*) is estimated by a second-order expansion with a diagonal
    AdaGrad Hessian, from the accumulated squared gradients Sᵢ ← Sᵢ + gᵢ ⊙ gᵢ:

        Êᵢ = gᵢᵀ diag(√(Sᵢ + 1e-7))⁻¹ gᵢ                       (Eq. 6-7)
        rᵢ = Êᵢ / Êᵢ⁽⁰⁾                                          (scale processing, Sec. 3.2)
        wᵢ ← wᵢ exp(η rᵢ),  then renormalised to Σ wᵢ = T       (exponentiated gradient, Eq. 9)

    Êᵢ⁽⁰⁾ is a task's excess risk at its first step (the baseline), on which its weight is not
    updated, as in the authors' code and LibMTL; weights start at 1. η is ``robust_step_size``
    (LibMTL's default 1e-2). Tasks far from their optimum get more weight, so a task with label
    noise (large irreducible loss but small excess risk) is not over-weighted.

    The method needs J (the element-wise squares of the gradients): Sᵢ is a T×P buffer over the
    setup() tasks, allocated at the first step (float32, float64 for float64 gradients). On a step
    with a subset of the tasks only their rows change, and their weights keep their total mass.

    Departures: the multiplicative update is done in log space, w_S ← (Σ_S w)·softmax(log w_S + η r_S),
    which is the same map but saturates instead of overflowing (TorchJD's form); rᵢ divides by
    Êᵢ⁽⁰⁾ + 1e-7 (TorchJD) so that a task whose first gradient was zero keeps finite weights.
    TorchJD starts from 1/T on the simplex and also updates at the first step, so its weights are
    this method's divided by T times a first-step factor; the test cross-checks the step-to-step
    ratios wᵢ⁽ᵏ⁺¹⁾/wᵢ⁽ᵏ⁾, which both compute from the same excess risks.
    """

    needs = "jacobian"
    heads = "weighted"  # its weights multiply the losses (the authors and LibMTL back-propagate Σ wᵢLᵢ)
    stateful = True

    def __init__(self, *, robust_step_size: float = 1e-2) -> None:
        super().__init__()
        self.robust_step_size = check_positive("excess_mtl", "robust_step_size", robust_step_size)
        self.register_buffer("sq_sum", torch.empty(0, 0))
        self.register_buffer("baseline", torch.empty(0, dtype=torch.float64))
        self.register_buffer("loss_weights", torch.empty(0, dtype=torch.float64))
        self._remember(robust_step_size=robust_step_size)

    def reset_state(self, num_tasks: int) -> None:
        self.sq_sum = torch.empty(num_tasks, 0)
        self.baseline = torch.full((num_tasks,), float("nan"), dtype=torch.float64)
        self.loss_weights = torch.ones(num_tasks, dtype=torch.float64)

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        j = step.jacobian.detach()  # type: ignore[union-attr]  # Method.forward checked
        if self.sq_sum.shape[1] != j.shape[1]:
            if bool((~torch.isnan(self.baseline)).any()):
                raise InvalidParameterError(
                    f"`excess_mtl` accumulates gradients of {self.sq_sum.shape[1]} parameters; the step has {j.shape[1]}")
            dtype = torch.float64 if j.dtype == torch.float64 else torch.float32
            self.sq_sum = torch.zeros(len(self.baseline), j.shape[1], dtype=dtype, device=j.device)
        sq = j.to(self.sq_sum.dtype).square()
        idx = idx.to(self.sq_sum.device)
        every = len(idx) == len(self.sq_sum) and bool((idx == torch.arange(len(idx), device=idx.device)).all())
        if every:  # in place: J-sized temporaries are the cost of this method
            self.sq_sum.add_(sq)
            h = (self.sq_sum + _ADAGRAD_EPS).sqrt_()
        else:
            self.sq_sum[idx] += sq
            h = (self.sq_sum[idx] + _ADAGRAD_EPS).sqrt_()
        excess = sq.div_(h).sum(dim=1).to(self.baseline)
        del h
        idx = idx.to(self.baseline.device)
        base = self.baseline[idx]
        first = torch.isnan(base)
        self.baseline[idx] = torch.where(first, excess, base)
        w = self.loss_weights[idx]
        seen = ~first
        if bool(seen.any()):
            ratio = excess[seen] / (base[seen] + _ADAGRAD_EPS)
            old = w[seen]
            w = w.clone()
            w[seen] = old.sum() * torch.softmax(old.log() + self.robust_step_size * ratio, dim=0)
            self.loss_weights[idx] = w
        return w.to(dtype=step.losses.dtype, device=step.losses.device)
