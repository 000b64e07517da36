"""Inverse data-size weighting: small data sets weigh more."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._weighting import PerTaskMethod, check_tasks
from polytask.methods.base import Step, check_positive, register


@register("inverse_size")
class InverseSize(PerTaskMethod):
    """Static weights from training-set sizes: λᵢ ∝ nᵢ^(−α), normalised so that Σᵢ λᵢ = T.

    The usual correction for multi-input training where tasks have data sets of very different
    sizes (α = 1 undoes proportional sampling; α = 0 is equal weighting). nᵢ comes from
    ``setup(sizes=...)`` (the trainer passes each task's training-set size). The normalisation is
    over all tasks, so a task's weight does not depend on which tasks share a step.
    """

    needs = "losses"

    def __init__(self, *, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = check_positive("inverse_size", "alpha", alpha, allow_zero=True)
        self.register_buffer("lambdas", torch.empty(0))
        self._remember(alpha=alpha)

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        if not sizes:
            raise InvalidParameterError(
                "`inverse_size` needs the training-set size of every task; setup() got no `sizes` "
                "(pass sizes={task: n}, or let the Trainer pass them from the data)")
        check_tasks(self, "sizes", list(sizes), tasks)
        missing = [t for t in tasks if t not in sizes]
        if missing:
            raise InvalidParameterError(f"`inverse_size` has no training-set size for task(s) {missing}")
        for task in tasks:
            n = sizes[task]
            if not (isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) and n > 0):
                raise InvalidParameterError(f"`sizes['{task}']` of `inverse_size` must be a number > 0; found {n!r}")
        super().setup(tasks)
        n = torch.tensor([float(sizes[t]) for t in tasks], dtype=torch.float64)
        lam = n.pow(-self.alpha)
        self.lambdas = (lam * len(tasks) / lam.sum()).to(self.lambdas)

    def weights_key(self, tasks: tuple[str, ...]) -> tuple[object, ...]:
        """The weights are λ's values for the step's tasks: the key is those values and the task list."""
        return (tuple(self._buffers["lambdas"].tolist()), getattr(self, "all_tasks", None))  # type: ignore[union-attr]

    def weights(self, step: Step) -> Tensor:
        return self.lambdas[self.index(step)].to(step.losses)
