"""Per-task metrics built on torchmetrics, each knowing whether higher is better.

What a metric's ``update(prediction, target)`` receives (labelled samples only, concatenated over
the batches of a flush, ``TaskMetrics.FLUSH_ELEMENTS``): regression values (N,) and float targets
(N,), in the target's units (float32; float64 for the built-in mse, rmse, mae and r2); binary
probabilities (N,) (sigmoid of the logit) and int64 targets; multiclass logits (N, C) and int64
class indices (N,); multilabel probabilities (N, C) and int64 0/1 targets (N, C). Two exceptions,
which give the values torchmetrics computes from those inputs, without its guess that a flush
holding a value outside [0, 1] holds logits: a torchmetrics binary or multilabel classification
metric with a ``threshold`` (accuracy, F1, precision, recall, balanced accuracy, …) receives the
bool labels ``probability > threshold``, and a multiclass torchmetrics precision-recall-curve
metric (AUROC, average precision, ROC) softmax probabilities (float32). A labelled row whose
prediction is NaN (multiclass: also a +inf logit, or all −inf, which have no softmax) reaches the
metrics as zeros, and every metric of its task is NaN for the epoch (see ``TaskMetrics``).
Vision kinds (``polytask.vision``): segmentation logits (N, C, H, W) and int64 maps (N, H, W)
(−1 = unlabelled pixel); dense_regression values (N, H, W) and float maps (N, H, W) (NaN = no
value); detection raw head outputs (N, A, 6 + C) and padded box rows (N, K, 5). Text kind
(``polytask.text``): generation logits (N, T, V) and int64 token ids (N, T).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from polytask.core.errors import InvalidParameterError, closest
from polytask.core.task import KINDS, Task
from polytask.vision.dense import IGNORE_INDEX

if TYPE_CHECKING:
    import torchmetrics


class _Deferred:
    """A module imported when one of its attributes is first read.

    Why: importing torchmetrics takes seconds (it imports its text and audio modules, and
    transformers when that is installed), and reading the registry (``polytask list``, a config's
    validation, Δm) builds no metric. The metric classes are imported when a metric is built.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):  # copy/pickle probe dunders on an instance without __init__'s state
            raise AttributeError(attr)
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)


C = _Deferred("torchmetrics.classification")
R = _Deferred("torchmetrics.regression")
# polytask's own torchmetrics.Metric subclasses
_AUROC, _TEXT = _Deferred("polytask.metrics.auroc"), _Deferred("polytask.text.metrics")
_BALANCED, _R2 = _Deferred("polytask.metrics.balanced_accuracy"), _Deferred("polytask.metrics.r2")
_COCO, _DENSE = _Deferred("polytask.vision.coco_eval"), _Deferred("polytask.vision.dense_metrics")


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
    # R² with float64 sums, as sklearn's r2_score (polytask.metrics.r2)
    MetricSpec("r2", True, lambda t: _R2.R2Score(), ("regression",)),
    MetricSpec("accuracy", True, _classification(
        lambda: C.BinaryAccuracy(), lambda num_classes: C.MulticlassAccuracy(num_classes=num_classes, average="micro"),
        lambda num_labels: C.MultilabelAccuracy(num_labels=num_labels)), _CLS),
    # the mean recall over the classes present in the targets (sklearn's balanced_accuracy_score);
    # multilabel: the mean over labels of each label's binary balanced accuracy (polytask.metrics.balanced_accuracy)
    MetricSpec("balanced_accuracy", True, _classification(
        lambda: _BALANCED.BinaryBalancedAccuracy(),
        lambda num_classes: _BALANCED.MulticlassBalancedAccuracy(num_classes=num_classes),
        lambda num_labels: _BALANCED.MultilabelBalancedAccuracy(num_labels=num_labels)), _CLS),
    MetricSpec("f1", True, _classification(
        lambda: C.BinaryF1Score(), lambda num_classes: C.MulticlassF1Score(num_classes=num_classes, average="macro"),
        lambda num_labels: C.MultilabelF1Score(num_labels=num_labels, average="macro")), _CLS),
    MetricSpec("auroc", True, _classification(
        lambda: _AUROC.BinaryAUROC(), lambda num_classes: C.MulticlassAUROC(num_classes=num_classes),
        lambda num_labels: C.MultilabelAUROC(num_labels=num_labels)), _CLS),
    # per-pixel metrics over labelled pixels; mIoU averages the classes' IoU (a class absent from both
    # prediction and target counts 0, torchmetrics' zero_division)
    MetricSpec("miou", True, lambda t: C.MulticlassJaccardIndex(num_classes=t.num_classes, ignore_index=IGNORE_INDEX,
                                                                 average="macro"), ("segmentation",)),
    MetricSpec("pixel_accuracy", True, lambda t: C.MulticlassAccuracy(
        num_classes=t.num_classes, ignore_index=IGNORE_INDEX, average="micro", multidim_average="global"), ("segmentation",)),
    MetricSpec("abs_error", False, lambda t: _DENSE.PixelError(relative=False), ("dense_regression",)),
    MetricSpec("rel_error", False, lambda t: _DENSE.PixelError(relative=True), ("dense_regression",)),
    # COCO mAP by pycocotools (polytask[vision]): @[.5:.95] and @0.5
    MetricSpec("map", True, lambda t: _COCO.MeanAveragePrecision(t.num_classes, iou="coco"), ("detection",)),
    MetricSpec("map50", True, lambda t: _COCO.MeanAveragePrecision(t.num_classes, iou=0.5), ("detection",)),
    # generated token sequences (polytask[text]): sacrebleu corpus BLEU (0-100), rouge-score F (0-1)
    MetricSpec("bleu", True, lambda t: _TEXT.BLEU(), ("generation",)),
    MetricSpec("rouge_1", True, lambda t: _TEXT.ROUGE("rouge1"), ("generation",)),
    MetricSpec("rouge_2", True, lambda t: _TEXT.ROUGE("rouge2"), ("generation",)),
    MetricSpec("rouge_l", True, lambda t: _TEXT.ROUGE("rougeL"), ("generation",)),
]


class MetricRegistry:
    def __init__(self, specs: list[MetricSpec]) -> None:
        self._specs = {s.name: s for s in specs}

    def register(self, name: str, factory: Callable[..., torchmetrics.Metric] | None = None, *, higher_is_better: bool,
                 kinds: Sequence[str] | str, overwrite: bool = False) -> Any:
        """Add a metric under ``name``; see :func:`register_metric`. Without ``factory``, a decorator."""
        if factory is None:
            return lambda f: self.register(name, f, higher_is_better=higher_is_better, kinds=kinds, overwrite=overwrite) or f
        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidParameterError(f"a metric name must be identifier-like (letters, digits, '_'); found {name!r}")
        if name == "loss":
            raise InvalidParameterError("'loss' is the name of every task's mean loss in the results; choose another "
                                        "metric name")
        if name in self._specs and not overwrite:
            raise InvalidParameterError(f"metric '{name}' is registered already; pass overwrite=True to replace it")
        if not isinstance(higher_is_better, bool):
            raise InvalidParameterError(f"`higher_is_better` of metric '{name}' must be True or False; found "
                                        f"{higher_is_better!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        for kind in kinds:
            if kind not in KINDS:
                raise InvalidParameterError(f"`kinds` of metric '{name}': {kind!r} is not a task kind."
                                            f"{closest(str(kind), KINDS)} Kinds: {', '.join(KINDS)}")
        if not kinds:
            raise InvalidParameterError(f"`kinds` of metric '{name}' must name at least one task kind ({', '.join(KINDS)})")
        if not callable(factory):
            raise InvalidParameterError(f"the factory of metric '{name}' must be callable (a torchmetrics.Metric class, or "
                                        f"a function of the Task); found {type(factory).__name__}")
        self._specs[name] = MetricSpec(name, higher_is_better, _task_factory(name, factory), kinds)
        return None

    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def names(self) -> list[str]:
        return sorted(self._specs)

    def get(self, name: str) -> MetricSpec:
        if name not in self._specs:
            raise InvalidParameterError(f"unknown metric '{name}'.{closest(name, self._specs)} Valid: {', '.join(self.names())} "
                                        "(or register one with polytask.metrics.register_metric)")
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


def _task_factory(name: str, factory: Callable[..., Any]) -> Callable[[Task], torchmetrics.Metric]:
    """``factory`` as a function of the Task, its result checked to be a torchmetrics.Metric.

    A torchmetrics.Metric class (or a functools.partial of one) is called with no argument; another
    callable with the Task when it takes a required positional parameter, else with none."""
    target = factory.func if isinstance(factory, functools.partial) else factory
    if isinstance(target, type):
        takes_task = False
    else:
        try:
            params = inspect.signature(factory).parameters.values()
        except (TypeError, ValueError):
            params = ()
        takes_task = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in params)

    def build(task: Task) -> torchmetrics.Metric:
        import torchmetrics  # imported by now: the factory built a metric (see ``_Deferred``)

        metric = factory(task) if takes_task else factory()
        if not isinstance(metric, torchmetrics.Metric):
            raise InvalidParameterError(f"metric '{name}' built {type(metric).__name__} for task '{task.name}'; expected a "
                                        "torchmetrics.Metric instance")
        return metric
    return build


METRICS = MetricRegistry(_SPECS)


def register_metric(name: str, factory: Callable[..., torchmetrics.Metric] | None = None, *, higher_is_better: bool,
                    kinds: Sequence[str] | str, overwrite: bool = False) -> Any:
    """Register a metric so that tasks can name it in ``metrics`` (from Python or YAML).

    Args:
        name: the name tasks use (identifier-like; not ``loss``).
        factory: a torchmetrics.Metric class (``torchmetrics.classification.BinaryPrecision``), a
            ``functools.partial`` of one, or a function ``(task) -> torchmetrics.Metric`` (read
            ``task.num_classes`` there). Called once per task and split. Omit it to use this as a
            decorator: ``@register_metric("top3", higher_is_better=True, kinds="multiclass")``.
        higher_is_better: the direction used for the best epoch, early stopping and Δm.
        kinds: the task kinds it applies to (regression, binary, multiclass, multilabel).
        overwrite: replace a metric of that name (otherwise registering it twice is an error).

    The inputs the metric's ``update`` receives per kind are listed in this module's docstring.
    """
    return METRICS.register(name, factory, higher_is_better=higher_is_better, kinds=kinds, overwrite=overwrite)
