"""Auto-Lambda: task weights learned by the gradient of the primary tasks' loss after a step."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._lazy_state import LazyStateMixin
from polytask.methods._weighting import PerTaskMethod, adam_step, check_tasks
from polytask.methods.base import Step, check_positive, register

MODES = ("online", "lookahead")


@register("auto_lambda")
class AutoLambda(LazyStateMixin, PerTaskMethod):
    """Auto-Lambda — Liu, James, Davison & Johns, "Auto-Lambda: Disentangling Dynamic Task
    Relationships", TMLR 2022 (Eq. 3-4), in an online first-order form.

    Auto-Lambda learns the weights λ of Σᵢ λᵢLᵢ by the bilevel problem

        min_λ F(θ'),   θ' = θ − α ∇θ Σᵢ λᵢLᵢ(θ) = θ − α Jᵀλ

    where F is the sum of the losses of the ``primary`` tasks (every task by default: Auto-Lambda's
    multi-task mode) on another batch. λ enters θ' linearly, so the hypergradient is exactly

        ∂F(θ')/∂λᵢ = −α gᵢᵀ ∇F(θ')

    which the authors' code approximates by a finite difference. Here θ' is the step actually
    taken: at step k + 1 the method has ∇F at θₖ₊₁ on the new batch (the sum of this step's primary
    rows of J) and the previous step's Jₖ (kept), so hₖ = −α Jₖ ∇F(θₖ₊₁); λ takes one Adam step on h
    (``lr``, the paper's 1e-4 by default), from ``init`` (the paper's 0.1). α = ``lookahead_lr``
    stands for the step size of θ (the model's learning rate in the paper). The step's weights are λ.

    Departures: the virtual look-ahead θ' and its extra batch are replaced by the step the optimiser
    takes and the next step's batch (an independent draw), so no second forward or backward is
    needed and the Trainer has no special case; this equals the paper's hypergradient when the
    optimiser is SGD with learning rate α on θ (the test checks that case against autograd through
    θ₁(λ)), and approximates it otherwise (Adam rescales the step). The look-ahead moves θ (the
    compared parameters) only, not the heads. J is kept between steps (a T×P buffer, like MoCo's),
    with per-task flags: a task without a loss at a step gets no hypergradient at the next one.
    ``mode: lookahead`` is the paper's virtual step instead: the method declares ``lookahead``, the
    Trainer gives it half of each batch as the inner batch (the step's losses and update) and the
    other half as the outer batch, and the engine evaluates ∇F at θ' = θ − αJᵀλ there
    (``Step.lookahead``), so hₖ = −α Jₖ ∇F(θ'ₖ) exactly, with no J kept between steps; it costs one
    more forward and backward per step and updates θ from half the batch.

    No peer implementation can be a test (the authors' code is a training script, LibMTL's bilevel
    code lives in its trainer); the test checks the hypergradient against autograd instead.
    """

    needs = "jacobian"
    heads = "weighted"  # λ weights the losses: the heads receive λᵢ∇Lᵢ, as in the paper's Σ λᵢLᵢ
    stateful = True

    def __init__(self, *, lr: float = 1e-4, lookahead_lr: float = 1e-3, init: float = 0.1,
                 primary: Sequence[str] | None = None, mode: str = "online") -> None:
        super().__init__()
        self.lr = check_positive("auto_lambda", "lr", lr)
        self.lookahead_lr = check_positive("auto_lambda", "lookahead_lr", lookahead_lr)
        self.init = check_positive("auto_lambda", "init", init)
        if primary is not None and (isinstance(primary, str) or not isinstance(primary, Sequence)
                                    or not primary or not all(isinstance(t, str) for t in primary)):
            raise InvalidParameterError(
                f"`primary` of `auto_lambda` must be a non-empty list of task names or None (every task); found {primary!r}")
        self.primary = None if primary is None else tuple(primary)
        if mode not in MODES:
            raise InvalidParameterError(f"`mode` of `auto_lambda` must be one of {', '.join(MODES)}; found {mode!r}")
        self.mode = mode
        self.lookahead = mode == "lookahead"  # type: ignore[misc]
        for name in ("lam", "exp_avg", "exp_avg_sq", "adam_steps"):
            self.register_buffer(name, torch.empty(0, dtype=torch.float64))
        self.register_buffer("previous", torch.empty(0, 0))
        self.register_buffer("has_previous", torch.empty(0, dtype=torch.bool))
        self.register_buffer("hypergradient", torch.empty(0, dtype=torch.float64), persistent=False)
        self._remember(lr=lr, lookahead_lr=lookahead_lr, init=init, primary=primary,
                       **({"mode": mode} if mode != "online" else {}))

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        if self.primary is not None:
            check_tasks(self, "primary", list(self.primary), tuple(tasks))
        super().setup(tasks, sizes=sizes, static_weights=static_weights)

    def reset_state(self, num_tasks: int) -> None:
        self.lam = torch.full((num_tasks,), self.init, dtype=torch.float64)
        for name in ("exp_avg", "exp_avg_sq", "adam_steps"):
            setattr(self, name, torch.zeros(num_tasks, dtype=torch.float64))
        self.previous = torch.empty(num_tasks, 0)
        self.has_previous = torch.zeros(num_tasks, dtype=torch.bool)
        self.hypergradient = torch.zeros(num_tasks, dtype=torch.float64)

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        j = step.jacobian.detach()  # type: ignore[union-attr]  # Method.forward checked
        if self.previous.shape[1] != j.shape[1]:
            if bool(self.has_previous.any()):
                raise InvalidParameterError(
                    f"`auto_lambda` keeps gradients of {self.previous.shape[1]} parameters; the step has {j.shape[1]}")
            self.previous = torch.zeros(len(self.lam), j.shape[1], dtype=j.dtype, device=j.device)
        primary = [i for i, t in enumerate(step.tasks) if self.primary is None or t in self.primary]
        if self.lookahead:
            return self._lookahead_step(step, idx, j, primary)
        rows = idx[self.has_previous[idx]]
        self.hypergradient = torch.zeros_like(self.lam)
        if primary and len(rows):
            outer = j[primary].sum(dim=0).to(self.previous.dtype)  # ∇F at the parameters the last step reached
            hyper = (-self.lookahead_lr * (self.previous[rows] @ outer)).double().to(self.lam.device)
            self.hypergradient[rows] = hyper
            new = adam_step(self.lam[rows], hyper, self.exp_avg[rows], self.exp_avg_sq[rows], self.adam_steps[rows],
                            lr=self.lr, weight_decay=0.0)
            for buffer, value in zip((self.lam, self.exp_avg, self.exp_avg_sq, self.adam_steps), new, strict=True):
                buffer[rows] = value
        self.has_previous.fill_(False)
        self.previous[idx] = j.to(self.previous.dtype)
        self.has_previous[idx] = True
        return self.lam[idx].to(dtype=step.losses.dtype, device=step.losses.device)

    def _lookahead_step(self, step: Step, idx: Tensor, j: Tensor, primary: list[int]) -> Tensor:
        if step.lookahead is None:
            raise InvalidParameterError("`auto_lambda` with mode=lookahead needs the step's outer batch (Step.lookahead)")
        self.hypergradient = torch.zeros_like(self.lam)
        if primary:
            lam = self.lam[idx].to(device=j.device, dtype=j.dtype)
            mask = torch.zeros(len(idx), dtype=j.dtype, device=j.device)
            mask[primary] = 1.0
            _, outer = step.lookahead(-self.lookahead_lr * (lam @ j), mask)  # ∇F at θ' = θ − αJᵀλ
            hyper = (-self.lookahead_lr * (j @ outer.to(j.dtype))).double().to(self.lam.device)
            self.hypergradient[idx] = hyper
            new = adam_step(self.lam[idx], hyper, self.exp_avg[idx], self.exp_avg_sq[idx], self.adam_steps[idx],
                            lr=self.lr, weight_decay=0.0)
            for buffer, value in zip((self.lam, self.exp_avg, self.exp_avg_sq, self.adam_steps), new, strict=True):
                buffer[idx] = value
        return self.lam[idx].to(dtype=step.losses.dtype, device=step.losses.device)
