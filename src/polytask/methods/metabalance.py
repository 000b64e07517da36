"""MetaBalance: auxiliary task gradients pulled toward the main task's gradient magnitude."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from polytask.core.errors import InvalidParameterError
from polytask.methods._groups import column_groups
from polytask.methods._lazy_state import LazyStateMixin
from polytask.methods._weighting import PerTaskMethod, check_tasks
from polytask.methods.base import Step, Update, check_positive, register

GROUPS = ("matrix", "whole")


@register("metabalance")
class MetaBalance(LazyStateMixin, PerTaskMethod):
    """MetaBalance — He et al., "MetaBalance: Improving Multi-Task
    Recommendations via Adapting Gradient Magnitudes of Auxiliary Tasks", WWW 2022 (Algorithm 1),
    as torch-rechub's ``MetaBalance`` optimiser computes it.

    One task is the main task (``main``; the first task given to setup() by default), the others
    are auxiliary. Per parameter tensor k (``group: matrix``, torch-rechub's granularity) or over all
    of θ (``group: whole``), each task keeps a moving average of its gradient norm, from 0:

        nᵢₖ ← β nᵢₖ + (1 − β) ‖gᵢₖ‖
        dₖ  = Σᵢ gᵢₖ (r · nₘₖ / (nᵢₖ + ε) + 1 − r)

    r ∈ [0, 1) is ``relax_factor`` (how far each auxiliary magnitude is moved to the main one; the
    paper's and torch-rechub's 0.7), β = ``beta`` (0.9), ε = ``eps`` (torch-rechub's 1e-5); the main
    task's own factor is r·nₘ/(nₘ + ε) + 1 − r ≈ 1. Because the factors differ per tensor, d is not
    a weighting of the task gradients: the method needs J and returns d as the direction, with weights 1
    (the heads receive ∇Lᵢ, as torch-rechub's second optimiser gives them). The norms are a T×K
    buffer over the setup() tasks (K tensors, known at the first step); on a step without the
    main task its stored average is used. Without parameter shapes in the step (a hand-built
    step) all of J is one group. The test re-derives torch-rechub's per-tensor loop on a small model.

    Departures: none in the update; ε is absolute, as in torch-rechub, so gradients far below
    ε (≲ 1e-6) are all scaled by about 1 − r.
    """

    needs = "jacobian"
    stateful = True

    def __init__(self, *, main: str | None = None, relax_factor: float = 0.7, beta: float = 0.9, eps: float = 1e-5,
                 group: str = "matrix") -> None:
        super().__init__()
        if main is not None and not isinstance(main, str):
            raise InvalidParameterError(f"`main` of `metabalance` must be a task name or None; found {main!r}")
        self.main = main
        for name, value in (("relax_factor", relax_factor), ("beta", beta)):
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value < 1.0):
                raise InvalidParameterError(f"`{name}` of `metabalance` must be in [0, 1); found {value!r}")
        self.relax_factor, self.beta = float(relax_factor), float(beta)
        self.eps = check_positive("metabalance", "eps", eps, allow_zero=True)
        if group not in GROUPS:
            raise InvalidParameterError(f"`group` of `metabalance` must be one of {', '.join(GROUPS)}; found {group!r}")
        self.group = group
        self.register_buffer("norms", torch.empty(0, 0, dtype=torch.float64))
        self._remember(main=main, relax_factor=relax_factor, beta=beta, eps=eps, group=group)

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        if self.main is not None:
            check_tasks(self, "main", [self.main], tuple(tasks))
        super().setup(tasks, sizes=sizes, static_weights=static_weights)

    def reset_state(self, num_tasks: int) -> None:
        self.norms = torch.empty(num_tasks, 0, dtype=torch.float64)

    def update(self, step: Step) -> Update:
        idx = self.index(step)
        j = step.jacobian.detach()  # type: ignore[union-attr]  # Method.forward checked
        groups = column_groups(step.param_shapes, j.shape[1], "whole" if self.group == "whole" else "matrix")
        if self.norms.shape[1] != len(groups):
            if bool((self.norms != 0).any()):
                raise InvalidParameterError(
                    f"`metabalance` keeps norms of {self.norms.shape[1]} parameter groups; the step has {len(groups)}")
            self.norms = torch.zeros(len(self.all_tasks), len(groups), dtype=torch.float64, device=self.norms.device)
        current = torch.stack([j[:, g].double().norm(dim=1) for g in groups], dim=1).to(self.norms.device)
        self.norms[idx] = self.beta * self.norms[idx] + (1 - self.beta) * current
        main = self.all_tasks.index(self.main) if self.main is not None else 0
        own = self.norms[idx]
        factors = self.relax_factor * self.norms[main] / (own + self.eps) + (1 - self.relax_factor)
        if self.eps == 0:
            factors = torch.where(own > 0, factors, torch.full_like(factors, 1 - self.relax_factor))
        factors = factors.to(device=j.device, dtype=j.dtype)
        direction = torch.cat([factors[:, k] @ j[:, g] for k, g in enumerate(groups)])
        return Update(torch.ones_like(step.losses), direction=direction)
