"""Per-task metrics built on torchmetrics, each knowing whether higher is better."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchmetrics
from torchmetrics import classification as C
from torchmetrics import regression as R

from polytask.core.errors import InvalidParameterError, closest
from polytask.core.task import Task


@dataclass(frozen=True)
class MetricSpec:
    name: str
    higher_is_better: bool
    factory: Callable[[Task], torchmetrics.Metric]
    kinds: tuple[str, ...]


def _classification(binary: Callable, multiclass: Callable, multilabel: Callable) -> Callable[[Task], torchmetrics.Metric]:
    def build(task: Task) -> torchmetrics.Metric:
        if task.kind == "binary":
            return binary()
        if task.kind == "multiclass":
            return multiclass(num_classes=task.num_classes)
        return multilabel(num_labels=task.num_classes)
    return build


_CLS = ("binary", "multiclass", "multilabel")
_SPECS = [
    MetricSpec("rmse", False, lambda t: R.MeanSquaredError(squared=False), ("regression",)),
    MetricSpec("mse", False, lambda t: R.MeanSquaredError(), ("regression",)),
    MetricSpec("mae", False, lambda t: R.MeanAbsoluteError(), ("regression",)),
    MetricSpec("r2", True, lambda t: R.R2Score(), ("regression",)),
    MetricSpec("accuracy", True, _classification(
        C.BinaryAccuracy, lambda num_classes: C.MulticlassAccuracy(num_classes=num_classes, average="micro"),
        C.MultilabelAccuracy), _CLS),
    MetricSpec("balanced_accuracy", True, _classification(
        lambda: C.MulticlassAccuracy(num_classes=2, average="macro"),
        lambda num_classes: C.MulticlassAccuracy(num_classes=num_classes, average="macro"),
        lambda num_labels: C.MultilabelAccuracy(num_labels=num_labels, average="macro")), _CLS),
    MetricSpec("f1", True, _classification(
        C.BinaryF1Score, lambda num_classes: C.MulticlassF1Score(num_classes=num_classes, average="macro"),
        lambda num_labels: C.MultilabelF1Score(num_labels=num_labels, average="macro")), _CLS),
    MetricSpec("auroc", True, _classification(
        C.BinaryAUROC, lambda num_classes: C.MulticlassAUROC(num_classes=num_classes),
        lambda num_labels: C.MultilabelAUROC(num_labels=num_labels)), _CLS),
]


class MetricRegistry:
    def __init__(self, specs: list[MetricSpec]) -> None:
        self._specs = {s.name: s for s in specs}

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> MetricSpec:
        if name not in self._specs:
            raise InvalidParameterError(f"unknown metric '{name}'.{closest(name, self._specs)} Valid: {', '.join(self.names())}")
        return self._specs[name]

    def kinds(self, name: str) -> tuple[str, ...]:
        return self.get(name).kinds

    def for_kind(self, kind: str) -> list[str]:
        return [n for n, s in sorted(self._specs.items()) if kind in s.kinds]

    def higher_is_better(self, name: str) -> bool:
        return self.get(name).higher_is_better

    def build(self, task: Task) -> dict[str, torchmetrics.Metric]:
        out = {}
        for name in task.metric_names:
            spec = self.get(name)
            if task.kind not in spec.kinds:
                raise InvalidParameterError(
                    f"metric '{name}' does not apply to {task.kind} task '{task.name}'; "
                    f"valid for {task.kind}: {', '.join(self.for_kind(task.kind))}")
            out[name] = spec.factory(task)
        return out


METRICS = MetricRegistry(_SPECS)
