"""Static per-task weights λ."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError, closest
from polytask.methods.base import Method, Step, register


@register("static")
class Static(Method):
    """Static weighted sum: Total = Σᵢ λᵢ Lᵢ with user-chosen λ.

    ``weights`` maps task name → λ; tasks left out take their ``Task.weight`` (default 1).
    Weights that are all 0 are refused at ``setup`` (nothing would train), except where
    ``warmup`` starts from them.
    """

    needs = "losses"

    #: warmup sets it on the Static it starts from: a warm-up may begin with all weights 0
    allow_all_zero = False

    def __init__(self, *, weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if weights is not None and not isinstance(weights, Mapping):
            raise InvalidParameterError(
                f"`weights` of `static` must map task names to numbers (e.g. {{income: 1.0}}); found {weights!r}")
        weights = dict(weights or {})
        for name, value in weights.items():
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise InvalidParameterError(f"`weights['{name}']` of `static` must be a finite number >= 0; found {value!r}")
        self.given = weights
        self.lambdas: dict[str, float] = dict(weights)
        self._remember(weights=weights)

    def setup(self, tasks: Sequence[str], *, sizes=None, static_weights=None) -> None:
        super().setup(tasks)
        for name in self.given:
            if name not in tasks:
                raise InvalidParameterError(
                    f"`weights` of `static` names unknown task '{name}'.{closest(name, tasks)} Tasks: {', '.join(tasks)}"
                )
        defaults = dict(static_weights or {})
        self.lambdas = {t: float(self.given.get(t, defaults.get(t, 1.0))) for t in tasks}
        if not self.allow_all_zero:
            self.check_trains()

    def check_trains(self) -> None:
        """Refuse weights that are all 0 (after ``setup``): the total loss would be 0 and nothing
        would train."""
        if self.lambdas and not any(self.lambdas.values()):
            shown = ", ".join(f"{t}: {w:g}" for t, w in self.lambdas.items())
            raise InvalidParameterError(
                f"`static` gives every task weight 0 ({{{shown}}}), so the total loss is 0 and nothing would train; "
                "expected at least one weight > 0: raise one in method.weights (or tasks.NAME.weight)")

    def weights_key(self, tasks: tuple[str, ...]) -> tuple[object, ...] | None:
        """The weights are the λ of the step's tasks: the key is those numbers (None for a task
        without one, so that the method is asked and names it)."""
        lambdas = getattr(self, "lambdas", None)
        if lambdas is None or not all(t in lambdas for t in tasks):
            return None
        return tuple(lambdas[t] for t in tasks)

    def weights(self, step: Step) -> Tensor:
        missing = [t for t in step.tasks if t not in self.lambdas]
        if missing:
            raise InvalidParameterError(f"`static` has no weight for task(s) {missing}; call setup() with all tasks")
        return torch.tensor([self.lambdas[t] for t in step.tasks], dtype=step.losses.dtype, device=step.losses.device)
