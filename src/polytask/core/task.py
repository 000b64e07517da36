"""`Task`: a named prediction target with its kind, loss, metrics and optimisation settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.core.errors import DataError, InvalidParameterError, ShapeError, closest

TaskKind = Literal["regression", "binary", "multiclass", "multilabel"]
KINDS: tuple[str, ...] = ("regression", "binary", "multiclass", "multilabel")

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("rmse", "mae", "r2"),
    "binary": ("accuracy", "f1", "auroc"),
    "multiclass": ("accuracy", "f1"),
    "multilabel": ("accuracy", "f1", "auroc"),
}


@dataclass(frozen=True)
class Task:
    """One task of a multi-task problem.

    Args:
        name: unique name; every per-task value in polytask is keyed by it.
        kind: ``regression`` (MSE loss), ``binary`` (BCE on one logit), ``multiclass``
            (cross-entropy over ``num_classes`` logits) or ``multilabel`` (BCE over
            ``num_classes`` logits).
        num_classes: classes (multiclass) or labels (multilabel).
        weight: static loss weight λ used by the ``static`` method (Total = Σ λᵢ Lᵢ).
        metrics: metric names (checked against ``polytask.metrics.METRICS`` when metrics are
            built); the first is the main one.
        lr: learning rate of this task's private parameters (default: the global one).
        weight_decay: weight decay of this task's private parameters (default: the global one).
        target: column holding this task's label, for data read from tables (multilabel: one 0/1
            column per label).
    """

    name: str
    kind: TaskKind
    num_classes: int | None = None
    weight: float = 1.0
    metrics: tuple[str, ...] | None = None
    lr: float | None = None
    weight_decay: float | None = None
    target: str | tuple[str, ...] | None = None
    _metrics: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise InvalidParameterError(
                f"task name must be an identifier-like string (letters, digits, '_'); found {self.name!r}"
            )
        if self.kind not in KINDS:
            raise InvalidParameterError(
                f"`kind` of task '{self.name}' must be one of {', '.join(KINDS)}; found {self.kind!r}."
                f"{closest(str(self.kind), KINDS)}"
            )
        if self.kind in ("multiclass", "multilabel"):
            if not isinstance(self.num_classes, int) or self.num_classes < 2:
                raise InvalidParameterError(
                    f"`num_classes` of {self.kind} task '{self.name}' must be an int >= 2; found {self.num_classes!r}"
                )
        elif self.num_classes is not None:
            raise InvalidParameterError(
                f"`num_classes` is only for multiclass/multilabel tasks; task '{self.name}' is {self.kind}"
            )
        if not (isinstance(self.weight, (int, float)) and math.isfinite(self.weight) and self.weight >= 0):
            raise InvalidParameterError(f"`weight` of task '{self.name}' must be a finite number >= 0; found {self.weight!r}")
        for key in ("lr", "weight_decay"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise InvalidParameterError(f"`{key}` of task '{self.name}' must be >= 0; found {value!r}")
        names = tuple(self.metrics) if self.metrics is not None else DEFAULT_METRICS[self.kind]
        if not names or not all(isinstance(m, str) for m in names):
            raise InvalidParameterError(f"`metrics` of task '{self.name}' must be a non-empty list of names; found {self.metrics!r}")
        object.__setattr__(self, "_metrics", names)

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self._metrics

    @property
    def main_metric(self) -> str:
        return self._metrics[0]

    @property
    def out_features(self) -> int:
        """Width of the head's output for this task."""
        return self.num_classes if self.kind in ("multiclass", "multilabel") else 1  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------- targets
    def prepare_prediction(self, output: Tensor) -> Tensor:
        """Check a head's raw output and give it the canonical shape: (B,) or (B, C)."""
        expected = self.out_features
        if output.dim() == 2 and output.shape[1] == expected:
            return output.squeeze(1) if self.kind in ("regression", "binary") else output
        if output.dim() == 1 and expected == 1:
            return output
        raise ShapeError(
            f"head of task '{self.name}' returned shape {tuple(output.shape)}; expected (batch, {expected})"
        )

    def check_targets(self, y: Tensor, where: str = "targets") -> None:
        """Raise a DataError if labels are NaN, of the wrong shape or out of range."""
        if not isinstance(y, Tensor) or y.is_complex():
            found = f"dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
            raise DataError(f"{where} of task '{self.name}' must be a tensor of real numbers; found {found}")
        if self.kind == "multilabel":
            if y.dim() != 2 or y.shape[1] != self.num_classes:
                raise DataError(
                    f"{where} of task '{self.name}' must have shape (n, {self.num_classes}); found {tuple(y.shape)}"
                )
        elif y.dim() != 1:
            raise DataError(f"{where} of task '{self.name}' must have shape (n,); found {tuple(y.shape)}")
        if y.is_floating_point() and torch.isnan(y).any():
            raise DataError(
                f"{where} of task '{self.name}' contain NaN at row {int(torch.isnan(y).reshape(len(y), -1).any(1).nonzero()[0])}; "
                "drop those rows or mark them missing with a mask"
            )
        if y.is_floating_point() and torch.isinf(y).any():
            raise DataError(
                f"{where} of task '{self.name}' contain inf at row {int(torch.isinf(y).reshape(len(y), -1).any(1).nonzero()[0])}; "
                "expected finite values"
            )
        if self.kind == "regression":
            return
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise DataError(f"{where} of {self.kind} task '{self.name}' must be integer labels; found non-integer values")
        high = 1 if self.kind in ("binary", "multilabel") else self.num_classes - 1  # type: ignore[operator]
        if y.numel() and (y.min() < 0 or y.max() > high):
            bad = y[(y < 0) | (y > high)][0].item()
            raise DataError(f"{where} of task '{self.name}' must lie in [0, {high}]; found label {bad:g}")

    def cast_targets(self, y: Tensor) -> Tensor:
        return y.long() if self.kind == "multiclass" else y.float()

    # -------------------------------------------------------------------------------------- loss
    def loss(self, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor | None:
        """Mean loss over labelled samples; ``None`` when no sample of the batch is labelled."""
        if mask is not None:
            if not bool(mask.any()):
                return None
            if not bool(mask.all()):
                prediction, target = prediction[mask], target[mask]
        if self.kind == "regression":
            return F.mse_loss(prediction, target)
        if self.kind == "multiclass":
            return F.cross_entropy(prediction, target)
        return F.binary_cross_entropy_with_logits(prediction, target)

    def predict(self, output: Tensor) -> Tensor:
        """Human-facing prediction: value, probability (binary), class index or label probabilities."""
        if self.kind == "regression":
            return output
        if self.kind == "multiclass":
            return output.argmax(-1)
        return torch.sigmoid(output)


def task_names(tasks: list[Task] | tuple[Task, ...]) -> tuple[str, ...]:
    names = tuple(t.name for t in tasks)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidParameterError(f"task names must be unique; found duplicates {dup}")
    if not names:
        raise InvalidParameterError("at least one task is required")
    return names
