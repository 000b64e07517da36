"""The contract every multi-task method fulfils: from what it `needs`, a weight per task.

An MTL update over shared parameters θ is d = Σᵢ wᵢ ∇θ Lᵢ for almost every published method, so
a method is a map from the step's information (losses, Gramian G = J Jᵀ, Jacobian J or the
feature Gramian) to w. The engine then runs one ordinary backward of Σ wᵢ Lᵢ.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.registry import Registry

Needs = Literal["losses", "gramian", "features", "jacobian"]
NEEDS: tuple[str, ...] = ("losses", "gramian", "features", "jacobian")


@dataclass
class Step:
    """What a method sees at one training step (only the active tasks, in this order).

    Attributes:
        tasks: names of the tasks that have a loss this step.
        losses: detached loss values, shape (T,).
        index: global step counter (0-based).
        generator: seeded generator for random methods (same stream on every rank).
        gramian: G = J Jᵀ (T×T) on θ, or on the shared representation in ``features`` mode.
        jacobian: J (T×P), per-task gradients of θ flattened, when ``needs == "jacobian"``.
        epoch: current epoch (0-based).
    """

    tasks: tuple[str, ...]
    losses: Tensor
    index: int = 0
    generator: torch.Generator | None = None
    gramian: Tensor | None = None
    jacobian: Tensor | None = None
    epoch: int = 0
    extras: dict[str, Any] = field(default_factory=dict)


class Method(nn.Module):
    """Base class of every weighting / gradient method.

    Subclasses set ``needs`` and implement :meth:`weights`. Learnable weights (e.g. uncertainty
    log-variances) are ``nn.Parameter`` s of the method; the trainer hands them to the optimizer.
    Any other state lives in buffers or in ``state_dict`` overrides keyed by task name, so that a
    resumed run continues exactly. Hyper-parameters are keyword-only and validated in ``__init__``.
    """

    needs: ClassVar[Needs] = "losses"
    #: True when ``weights`` may return values that are not a plain weighting of the gradients
    #: (e.g. GradDrop); such methods implement :meth:`direction` instead.
    returns_direction: ClassVar[bool] = False
    #: θ the per-task gradients are taken on: all shared parameters, or only the last shared layer
    #: (GradNorm's choice, and a cheap approximation for any Gramian method).
    scope: ClassVar[Literal["shared", "last_shared"]] = "shared"
    #: False for methods whose weights are not permuted along with the tasks (random task orders,
    #: as in PCGrad); the conformance suite skips the permutation check for them.
    permutation_equivariant: ClassVar[bool] = True

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        """Called once before training with all task names and, when known, their data sizes."""
        self.all_tasks = tuple(tasks)

    def weights(self, step: Step) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement weights(step)")

    def penalty(self, step: Step, losses: Tensor) -> Tensor | None:
        """Extra differentiable term added to Σ wᵢ Lᵢ (e.g. uncertainty weighting's log σ)."""
        return None

    def direction(self, step: Step) -> Tensor:
        """Update direction on θ, shape (P,). Default: wᵀ J."""
        if step.jacobian is None:
            raise InvalidParameterError(f"{type(self).__name__}.direction needs step.jacobian")
        return self.weights(step) @ step.jacobian

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float],
                     val_metrics: Mapping[str, Mapping[str, float]] | None = None) -> None:
        """Hook for methods that adapt once per epoch (DWA, task prioritisation)."""

    def extra_repr(self) -> str:
        params = getattr(self, "_hparams", {})
        return ", ".join(f"{k}={v!r}" for k, v in params.items())

    def _remember(self, **hparams: Any) -> None:
        """Record hyper-parameters for ``repr``."""
        self._hparams = hparams


METHODS: Registry[Method] = Registry("method")


def register(name: str):
    """Class decorator: add a Method subclass to the registry under ``name``."""
    def decorate(cls: type[Method]) -> type[Method]:
        if cls.needs not in NEEDS:
            raise InvalidParameterError(f"{cls.__name__}.needs must be one of {NEEDS}; found {cls.needs!r}")
        return METHODS.register(name)(cls)  # type: ignore[return-value]
    return decorate


def get_method(method: str | Method, **params: Any) -> Method:
    """A method object from a registry name (with parameters) or an instance."""
    if isinstance(method, Method):
        if params:
            raise InvalidParameterError("parameters can only be given with a method name, not an instance")
        return method
    if not isinstance(method, str):
        raise InvalidParameterError(f"method must be a registry name or a Method; found {type(method).__name__}")
    return METHODS.create(method, **params)


def check_positive(owner: str, name: str, value: float, *, allow_zero: bool = False) -> float:
    """Validate a numeric hyper-parameter (`name` of `owner` must be > 0 / >= 0)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidParameterError(f"`{name}` of `{owner}` must be {bound}; found {value!r}")
    return float(value)
