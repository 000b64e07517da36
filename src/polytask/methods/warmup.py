"""Warm-up wrapper: blend static weights into any method's weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from polytask.core.errors import InvalidParameterError
from polytask.methods.base import Method, Step, Update, get_method, register
from polytask.methods.static import Static


@register("warmup")
class Warmup(Method):
    """Linear warm-up from static weights λ to a method's weights over ``steps`` steps.

        wᵢ(t) = (1 − a) λᵢ + a · wᵢ^method(t),   a = min(1, t / N)

    with t the global step index and N = ``steps`` (a = 1 throughout when N = 0). ``weights``
    maps task → λ; unlisted tasks take their ``Task.weight`` (1 by default), as in ``static``.
    ``needs``, ``compare``, ``setup`` and ``on_epoch_end`` are the inner method's, and the inner
    method's update is computed every step so its state keeps evolving during the warm-up. Its
    penalty (e.g. uncertainty weighting's Σ ½ sᵢ) is scaled by a too, so the total is the
    blend (1 − a) Σ λᵢ Lᵢ + a · (inner total) and learnable parameters do not drift while a = 0.
    The inner method is named by ``inner`` (a registry name) with ``inner_params``, e.g.
    ``{name: warmup, inner: dwa, inner_params: {temperature: 2}, steps: 500}`` (not ``method``:
    that name is taken by ``get_method``'s own argument). It is the submodule ``inner``, so
    ``state_dict()`` includes its state.
    """

    stateful = True  # the blend follows the step counter
    example_params = {"inner": "dwa", "steps": 3}

    def __init__(self, *, inner: str, inner_params: Mapping[str, Any] | None = None, steps: int,
                 weights: Mapping[str, float] | None = None) -> None:
        super().__init__()
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise InvalidParameterError(f"`steps` of `warmup` must be an int >= 0; found {steps!r}")
        if not isinstance(inner, str):
            raise InvalidParameterError(f"`inner` of `warmup` must be a method's registry name; found {inner!r}")
        self.inner = get_method(inner, **dict(inner_params or {}))
        if self.inner.needs == "jacobian":
            raise InvalidParameterError(
                f"`warmup` blends task weights; '{inner}' returns an update direction and cannot be warmed up")
        self.needs = self.inner.needs  # type: ignore[misc]
        self.compare = self.inner.compare  # type: ignore[misc]
        self.heads = self.inner.heads  # type: ignore[misc]
        self.permutation_equivariant = getattr(self.inner, "permutation_equivariant", True)  # type: ignore[misc]
        self.steps = steps
        self.start = Static(weights=weights)
        self.start.allow_all_zero = True  # a warm-up may start from nothing
        self._remember(inner=inner, inner_params=dict(inner_params or {}), steps=steps, weights=weights)

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        super().setup(tasks, sizes=sizes, static_weights=static_weights)
        self.start.setup(tasks, static_weights=static_weights)
        self.inner.setup(tasks, sizes=sizes, static_weights=static_weights)

    @property
    def is_set_up(self) -> bool:
        # The inner method is what holds the state: a fresh Warmup that loaded a state dict has an
        # inner method set up with the saved tasks, and setting it up again would reset that state.
        return self.inner.is_set_up

    def progress(self, step: Step) -> float:
        """a = min(1, t / N)."""
        return 1.0 if self.steps == 0 else min(1.0, step.index / self.steps)

    def update(self, step: Step) -> Update:
        if getattr(self, "all_tasks", None) is None:
            # used without setup(), or a fresh Warmup that loaded a state: the inner method decides
            super().setup(step.tasks)
            self.start.setup(step.tasks)
        a = self.progress(step)
        inner = self.inner(step)
        penalty = None if inner.penalty is None else a * inner.penalty
        return Update((1 - a) * self.start.weights(step) + a * inner.weights, penalty=penalty)

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float],
                     val_metrics: Mapping[str, Mapping[str, float]] | None = None) -> None:
        self.inner.on_epoch_end(epoch, train_losses, val_metrics)
