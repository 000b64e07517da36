"""`Task`: a named prediction target with its kind, loss, metrics and optimisation settings."""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from polytask.core.errors import DataError, InvalidParameterError, ShapeError, closest
from polytask.core.losses import LOSSES, LossSpec, TaskLoss

logger = logging.getLogger("polytask")

TaskKind = Literal["regression", "binary", "multiclass", "multilabel", "segmentation", "dense_regression", "detection",
                   "generation"]
KINDS: tuple[str, ...] = ("regression", "binary", "multiclass", "multilabel", "segmentation", "dense_regression", "detection",
                          "generation")
#: kinds whose targets are maps or box lists and whose heads read a feature map (``polytask.vision``)
VISION_KINDS: tuple[str, ...] = ("segmentation", "dense_regression", "detection")
#: kinds whose targets are token-id sequences, decoded by a generator head (``polytask.text``)
TEXT_KINDS: tuple[str, ...] = ("generation",)
#: token ids every generation vocabulary reserves: padding, unknown, begin and end of sequence
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3

DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    "regression": ("rmse", "mae", "r2"),
    "binary": ("accuracy", "f1", "auroc"),
    "multiclass": ("accuracy", "f1"),
    "multilabel": ("accuracy", "f1", "auroc"),
    "segmentation": ("miou", "pixel_accuracy"),
    "dense_regression": ("abs_error", "rel_error"),
    "detection": ("map50", "map"),
    "generation": ("bleu", "rouge_1", "rouge_2", "rouge_l"),
}



#: names a task cannot take: attributes of nn.ModuleDict (where per-task modules are kept)
_MODULE_ATTRIBUTES = frozenset(name for name in dir(nn.ModuleDict) if not name.startswith("__"))

@dataclass(frozen=True)
class Task:
    """One task of a multi-task problem.

    Args:
        name: unique name; every per-task value in polytask is keyed by it.
        kind: ``regression`` (one value per sample), ``binary`` (one logit), ``multiclass``
            (``num_classes`` logits, one class per sample) or ``multilabel`` (``num_classes``
            logits, each label 0/1). Vision kinds (``polytask.vision``; their heads need an
            encoder exposing a feature map, such as ``cnn_map``): ``segmentation`` (a class per
            pixel: targets (n, H, W) int in [0, C), −1 = unlabelled pixel), ``dense_regression`` (a
            value per pixel: targets (n, H, W) float, NaN = no value at that pixel) and ``detection``
            (boxes with classes: targets (n, K, 5) rows ``[class, x1, y1, x2, y2]`` in pixels, x2 > x1,
            y2 > y1, padded with class −1 rows; an image with no object has only padding rows).
            Text kind (``polytask.text``): ``generation`` (a token sequence per sample: targets (n, T) int
            ids in [0, num_classes), each text's tokens then EOS (3), padded with 0; ids 1 and 2 are
            unknown and BOS; the head outputs (n, T, num_classes) logits).
        num_classes: classes (multiclass) or labels (multilabel); required for those kinds. From
            training labels: ``num_classes=infer_num_classes(name, y_train)`` (a YAML config may
            leave it out, the builder infers it and logs the value).
            Also the classes of ``segmentation`` (>= 2, background included) and ``detection`` (>= 1,
            object classes; no background class) tasks, and the vocabulary size of ``generation``
            tasks (>= 5: the four reserved ids and one word).
        weight: static loss weight λ used by the ``static`` method (Total = Σ λᵢ Lᵢ).
        metrics: metric names (checked against ``polytask.metrics.METRICS`` when metrics are
            built); the first is the main one. Default per kind: regression rmse, mae, r2;
            binary and multilabel accuracy, f1, auroc; multiclass accuracy, f1. Add your own with
            ``polytask.metrics.register_metric`` before building the task's metrics.
        lr: learning rate of this task's private parameters (default: the global one).
        weight_decay: weight decay of this task's private parameters (default: the global one).
        target: column holding this task's label, for data read from tables (multilabel: one 0/1
            column per label).
        loss: this task's loss (see ``polytask.core.losses``). ``None``: the kind's default, ``mse``
            (regression), ``bce`` (binary, multilabel) or ``ce`` (multiclass). A registered name,
            ``"huber"``, or a name with parameters, ``{"name": "focal", "gamma": 2.0}``:

            - ``mse``, ``l1``, ``huber`` (``delta`` = 1.0): regression;
            - ``bce`` (``pos_weight``: weight of positives, one number, or one per label for
              multilabel): binary, multilabel;
            - ``ce`` (``class_weights``: one per class; ``label_smoothing`` in [0, 1)): multiclass;
            - ``focal`` (Lin et al., ICCV 2017; ``gamma`` = 2.0, ``alpha``: weight of positives
              for binary/multilabel, one weight per class for multiclass): binary, multilabel,
              multiclass.

            Or any callable ``(prediction, target) -> scalar tensor``, called on the labelled
            samples only, with prediction/target shapes per kind: regression (N,) / (N,) float;
            binary logits (N,) / (N,) float 0-1; multiclass logits (N, C) / (N,) int64;
            multilabel logits (N, C) / (N, C) float 0-1. Its first values are checked (a finite
            0-dim tensor with a gradient), with an error naming the task. After construction the
            attribute is a :class:`~polytask.core.losses.TaskLoss`, called as
            ``task.loss(prediction, target, mask=None)``: the mean loss over labelled samples,
            ``None`` when no sample of the batch is labelled.
        target_scaling: ``(mean, std)`` of a regression target: the model learns (y − mean)/std
            (the data hold standardised targets, so losses and gradient norms do not depend on
            the target's units), while metrics and ``predict`` are in the original units. The
            config builder fits it on the training rows (``tasks.NAME.standardize``, on by
            default); ``standardize_targets`` does it for data built in Python.
        size: ``(H, W)`` of the images of a vision task: per-pixel targets must have it, boxes must
            lie inside it, per-pixel heads output it (default: the encoder's feature map × stride).
    """

    name: str
    kind: TaskKind
    num_classes: int | None = None
    weight: float = 1.0
    metrics: tuple[str, ...] | None = None
    lr: float | None = None
    weight_decay: float | None = None
    target: str | tuple[str, ...] | None = None
    loss: LossSpec | TaskLoss = None
    target_scaling: tuple[float, float] | None = None
    size: tuple[int, int] | None = None
    _metrics: tuple[str, ...] = field(init=False, repr=False, compare=False, default=())

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.isidentifier():
            raise InvalidParameterError(
                f"task name must be an identifier-like string (letters, digits, '_'); found {self.name!r}"
            )
        if self.name in _MODULE_ATTRIBUTES:
            # heads, towers and gates live in nn.ModuleDicts keyed by task name, which cannot hold
            # a key that is one of torch.nn.Module's own attributes
            raise InvalidParameterError(
                f"task name {self.name!r} is an attribute of torch's nn.Module (like train, eval, type, forward), so "
                f"per-task modules cannot be stored under it; rename the task, e.g. {self.name + '_'!r}")
        if self.target_scaling is not None:
            mean, std = self.target_scaling
            if self.kind != "regression" or not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise InvalidParameterError(f"`target_scaling` of task '{self.name}' must be (mean, std > 0), finite, for "
                                            f"a regression task; found {self.target_scaling!r} on a {self.kind} task")
        if self.kind not in KINDS:
            raise InvalidParameterError(
                f"`kind` of task '{self.name}' must be one of {', '.join(KINDS)}; found {self.kind!r}."
                f"{closest(str(self.kind), KINDS)}"
            )
        if self.kind in ("multiclass", "multilabel", "segmentation", "detection", "generation"):
            fewest = {"detection": 1, "generation": EOS_ID + 2}.get(self.kind, 2)
            if not isinstance(self.num_classes, int) or isinstance(self.num_classes, bool) or self.num_classes < fewest:
                hint = (f"; to take it from the training labels: num_classes=infer_num_classes({self.name!r}, y_train)"
                        if self.num_classes is None and self.kind == "multiclass" else "")
                raise InvalidParameterError(
                    f"`num_classes` of {self.kind} task '{self.name}' must be an int >= {fewest}; found {self.num_classes!r}{hint}"
                )
        elif self.num_classes is not None:
            raise InvalidParameterError(
                f"`num_classes` is only for multiclass/multilabel/segmentation/detection/generation tasks; task '{self.name}' is "
                f"{self.kind}"
            )
        if self.size is not None:
            size = tuple(self.size) if isinstance(self.size, (list, tuple)) else ()
            if self.kind not in VISION_KINDS or len(size) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
                raise InvalidParameterError(f"`size` of task '{self.name}' must be (height, width), two positive ints, for a "
                                            f"{'/'.join(VISION_KINDS)} task; found {self.size!r} on a {self.kind} task")
            object.__setattr__(self, "size", size)
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
        object.__setattr__(self, "loss", LOSSES.resolve(self.loss, task=self.name, kind=self.kind,
                                                        num_classes=self.num_classes))

    @property
    def metric_names(self) -> tuple[str, ...]:
        return self._metrics

    @property
    def main_metric(self) -> str:
        return self._metrics[0]

    @property
    def out_features(self) -> int:
        """Width of the head's output for this task (per pixel for per-pixel kinds; per cell for
        detection: 6 box columns, then one logit per class)."""
        if self.kind == "detection":
            return self.num_classes + 6  # type: ignore[operator]
        return self.num_classes if self.kind in ("multiclass", "multilabel", "segmentation", "generation") else 1  # type: ignore[return-value]

    # ----------------------------------------------------------------------------------- targets
    def prepare_prediction(self, output: Tensor) -> Tensor:
        """Check a head's raw output and give it the canonical shape: (B,) or (B, C); per-pixel
        kinds (B, C, H, W) (segmentation) or (B, H, W) (dense_regression); detection (B, A, 6 + C)."""
        expected = self.out_features
        if self.kind in VISION_KINDS:
            return self._prepare_vision(output, expected)
        if self.kind == "generation":
            if output.dim() == 3 and output.shape[2] == expected:
                return output
            raise ShapeError(f"head of generation task '{self.name}' returned shape {tuple(output.shape)}; expected "
                             f"(batch, length, {expected}): one logit per vocabulary id at every position")
        if output.dim() == 2 and output.shape[1] == expected:
            return output.squeeze(1) if self.kind in ("regression", "binary") else output
        if output.dim() == 1 and expected == 1:
            return output
        raise ShapeError(
            f"head of task '{self.name}' returned shape {tuple(output.shape)}; expected (batch, {expected})"
        )

    def _prepare_vision(self, output: Tensor, expected: int) -> Tensor:
        size = "H, W" if self.size is None else f"{self.size[0]}, {self.size[1]}"
        if self.kind == "detection":
            if output.dim() == 3 and output.shape[2] == expected:
                return output
            raise ShapeError(f"head of detection task '{self.name}' returned shape {tuple(output.shape)}; expected "
                             f"(batch, cells, {expected}) = 6 box columns + {self.num_classes} class logits")
        ok = output.dim() == 4 and output.shape[1] == expected and (
            self.size is None or tuple(output.shape[2:]) == self.size)
        if ok:
            return output.squeeze(1) if self.kind == "dense_regression" else output
        raise ShapeError(f"head of {self.kind} task '{self.name}' returned shape {tuple(output.shape)}; expected "
                         f"(batch, {expected}, {size})")

    def _check_vision_targets(self, y: Tensor, where: str) -> None:
        """Per-pixel maps (n, H, W) and padded box lists (n, K, 5): shape, finiteness, ranges; the
        first bad sample is named with what was expected."""
        of = f"{where} of {self.kind} task '{self.name}'"
        if self.kind == "detection":
            if y.dim() != 3 or y.shape[2] != 5:
                raise DataError(f"{of} must have shape (n, K, 5): per image K rows [class, x1, y1, x2, y2], padded with "
                                f"class -1 rows; found {tuple(y.shape)}")
            if not torch.isfinite(y).all():
                row, box = (int(v) for v in (~torch.isfinite(y)).any(2).nonzero()[0])
                raise DataError(f"{of}: sample {row}, box {box} holds a non-finite value ({y[row, box].tolist()}); expected "
                                "finite pixel coordinates (padding rows: class -1 and any finite numbers)")
            labels, boxes = y[..., 0], y[..., 1:]
            bad = (labels != labels.round()) | (labels < -1) | (labels > self.num_classes - 1)  # type: ignore[operator]
            if bad.any():
                row, box = (int(v) for v in bad.nonzero()[0])
                raise DataError(f"{of}: sample {row}, box {box} has class {labels[row, box].item():g}; expected an integer in "
                                f"[0, {self.num_classes - 1}] (or -1 for a padding row)")  # type: ignore[operator]
            real = labels >= 0
            checks = [(boxes[..., 2] <= boxes[..., 0], "x2 > x1"), (boxes[..., 3] <= boxes[..., 1], "y2 > y1"),
                      ((boxes[..., 0] < 0) | (boxes[..., 1] < 0), "x1 >= 0 and y1 >= 0")]
            if self.size is not None:
                height, width = self.size
                checks.append(((boxes[..., 2] > width) | (boxes[..., 3] > height),
                               f"x2 <= {width} and y2 <= {height} (inside the {height}x{width} image)"))
            for wrong, expected in checks:
                wrong = wrong & real
                if wrong.any():
                    row, box = (int(v) for v in wrong.nonzero()[0])
                    raise DataError(f"{of}: sample {row}, box {box} is [x1, y1, x2, y2] = "
                                    f"{[round(v, 3) for v in boxes[row, box].tolist()]}; expected {expected}")
            return
        expected_shape = "(n, H, W)" if self.size is None else f"(n, {self.size[0]}, {self.size[1]})"
        if y.dim() != 3 or (self.size is not None and tuple(y.shape[1:]) != self.size):
            raise DataError(f"{of} must be one map per image of shape {expected_shape}; found {tuple(y.shape)}")
        if self.kind == "dense_regression":
            if torch.isinf(y).any():
                row = int(torch.isinf(y).flatten(1).any(1).nonzero()[0])
                raise DataError(f"{of}: sample {row} holds inf; expected finite values (NaN marks a pixel without a value)")
            return
        if y.is_floating_point() and (torch.isnan(y).any() or not torch.equal(y, y.round())):
            row = int(((y != y.round()) | torch.isnan(y)).flatten(1).any(1).nonzero()[0])
            raise DataError(f"{of}: sample {row} holds non-integer labels; expected class indices (int, -1 = unlabelled pixel)")
        bad = (y < -1) | (y > self.num_classes - 1)  # type: ignore[operator]
        if bad.any():
            row = int(bad.flatten(1).any(1).nonzero()[0])
            raise DataError(f"{of}: sample {row} has pixel label {y[row][bad[row]][0].item():g}; expected a class in "
                            f"[0, {self.num_classes - 1}] or -1 (unlabelled pixel)")  # type: ignore[operator]

    def _check_token_targets(self, y: Tensor, where: str) -> None:
        """Token-id sequences (n, T): integer ids in [0, V), at least one token per row."""
        of = f"{where} of generation task '{self.name}'"
        if y.dim() != 2 or y.shape[1] < 1:
            raise DataError(f"{of} must have shape (n, T): one row of token ids per text, padded with {PAD_ID}; found "
                            f"{tuple(y.shape)}")
        high = self.num_classes - 1  # type: ignore[operator]
        if y.is_floating_point():
            wrong = ~torch.isfinite(y) | (y != y.round())
            if wrong.any():
                row, position = (int(v) for v in wrong.nonzero()[0])
                raise DataError(f"{of}: row {row}, position {position} holds {y[row, position].item():g}; expected an "
                                f"integer token id in [0, {high}]")
        wrong = (y < 0) | (y > high)
        if wrong.any():
            row, position = (int(v) for v in wrong.nonzero()[0])
            raise DataError(f"{of}: row {row}, position {position} holds token id {y[row, position].item():g}; expected an "
                            f"id in [0, {high}] (the vocabulary has {self.num_classes} ids)")
        empty = (y == PAD_ID).all(1)
        if empty.any():
            raise DataError(f"{of}: row {int(empty.nonzero()[0])} is empty (only padding); expected at least one token (the "
                            f"text's words, then EOS = {EOS_ID}); drop empty texts or mask the row")

    def check_targets(self, y: Tensor, where: str = "targets") -> None:
        """Raise a DataError if labels are NaN, of the wrong shape or out of range."""
        if not isinstance(y, Tensor) or y.is_complex():
            found = f"dtype {y.dtype}" if isinstance(y, Tensor) else type(y).__name__
            raise DataError(f"{where} of task '{self.name}' must be a tensor of real numbers; found {found}")
        if self.kind in VISION_KINDS:
            self._check_vision_targets(y, where)
            return
        if self.kind == "generation":
            self._check_token_targets(y, where)
            return
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
        return y.long() if self.kind in ("multiclass", "segmentation", "generation") else y.float()

    def unscale(self, values: Tensor) -> Tensor:
        """Regression values from the model's (standardised) space back to the target's units."""
        if self.target_scaling is None:
            return values
        mean, std = self.target_scaling
        return values * std + mean

    def predict(self, output: Tensor) -> Tensor:
        """Human-facing prediction: value (in the target's units), probability (binary), class
        index or label probabilities; per pixel a class (segmentation) or value (dense_regression);
        detections (B, M, 6) ``[x1, y1, x2, y2, score, class]`` padded with class −1 (detection)."""
        if self.kind == "regression":
            return self.unscale(output)
        if self.kind in ("multiclass", "generation"):  # generation: the token ids the head's decoding chose
            return output.argmax(-1)
        if self.kind == "segmentation":
            return output.argmax(1)
        if self.kind == "dense_regression":
            return output
        if self.kind == "detection":
            # polytask.vision imports core; core reaches it only here, at call time
            return importlib.import_module("polytask.vision.detection").Decoder().padded(output)
        return torch.sigmoid(output)


def task_names(tasks: list[Task] | tuple[Task, ...]) -> tuple[str, ...]:
    names = tuple(t.name for t in tasks)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise InvalidParameterError(f"task names must be unique; found duplicates {dup}")
    if not names:
        raise InvalidParameterError("at least one task is required")
    return names


def infer_num_classes(task: str | Task, labels: Tensor | np.ndarray | Iterable[Any], source: str = "the training labels") -> int:
    """The number of classes of a multiclass task, read from its training labels, and logged.

    ``labels``: integer class codes (a tensor, an array, a pandas Series, a list) give
    ``max + 1`` classes (codes are 0-based: class 0 always exists); text labels (or a label
    vocabulary such as ``data.files.label_vocabulary`` returns) give the number of distinct
    labels, which become codes in sorted order. Missing values (NaN, None) are skipped.

    The value is logged on the ``polytask`` logger: INFO, or WARNING when some codes in
    ``0..max`` never occur (1-based labels, or classes missing from the training split). Raises
    a DataError naming the task when the labels are not class codes or hold fewer than 2 classes.
    """
    name = task.name if isinstance(task, Task) else str(task)
    if isinstance(labels, Tensor):
        values = labels.detach().cpu()
        values = (values.double() if values.is_floating_point() else values).numpy()
    elif isinstance(labels, np.ndarray):
        values = labels
    elif hasattr(labels, "dropna") and hasattr(labels, "to_numpy"):  # pandas, missing values as pandas marks them
        values = labels.dropna().to_numpy()
    else:
        values = np.asarray(list(labels), dtype=object)
    values = values.reshape(-1)
    if values.dtype == object:
        values = np.array([v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))],
                          dtype=object)
        if len(values) and all(isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)
                               for v in values):
            values = values.astype(np.float64)
    elif values.dtype.kind == "f":
        values = values[~np.isnan(values)]
    cannot = f"task '{name}': cannot infer num_classes from {source}"
    if len(values) == 0:
        raise DataError(f"{cannot}: there are none; give num_classes")
    if values.dtype.kind in "biuf":
        numbers = values.astype(np.float64)
        bad = ~np.isfinite(numbers) | (numbers != np.round(numbers)) | (numbers < 0)
        if bad.any():
            raise DataError(f"{cannot}: label {numbers[bad][0]:g} is not a class code (expected integers 0, 1, ..., "
                            "C-1, or text labels)")
        codes = np.unique(numbers.astype(np.int64))
        count = int(codes[-1]) + 1
        if count < 2:
            raise DataError(f"{cannot}: every label is 0 (one class); a multiclass task needs at least 2: give num_classes")
        absent = sorted(set(range(count)) - set(codes.tolist()))
        message = f"task '{name}': num_classes inferred as {count} from {source} (0..{count - 1})"
        if absent:
            shown = ", ".join(map(str, absent[:10])) + (f" and {len(absent) - 10} more" if len(absent) > 10 else "")
            note = "; the labels look 1-based: codes must start at 0" if absent == [0] else ""
            logger.warning(f"{message}; class(es) {shown} never occur{note}")
        else:
            logger.info(message)
        return count
    text = sorted({str(v) for v in values})
    if len(text) < 2:
        raise DataError(f"{cannot}: every label is {text[0]!r} (one class); a multiclass task needs at least 2: give "
                        "num_classes")
    shown = ", ".join(map(repr, text[:5])) + (f", ... ({len(text) - 5} more)" if len(text) > 5 else "")
    logger.info(f"task '{name}': num_classes inferred as {len(text)} from {source} ({shown})")
    return len(text)


def standardize_targets(tasks: list[Task], train: Any, *others: Any) -> list[Task]:
    """Fit (mean, std) on the training targets of every regression task without a
    ``target_scaling`` yet, standardise its targets in ``train`` and ``others`` in place
    (``MultiOutputDataset`` s or ``TaskDatasets``; masked rows are left out of the fit) and
    return the tasks with their ``target_scaling`` set."""
    import dataclasses

    def sets(data: Any) -> list[Any]:
        return [] if data is None else list(getattr(data, "datasets", {None: data}).values())

    out = []
    for task in tasks:
        fitted = [ds for ds in sets(train) if task.name in ds.targets]
        if task.kind != "regression" or task.target_scaling is not None or not fitted:
            out.append(task)
            continue
        values = torch.cat([ds.targets[task.name][ds.masks[task.name]] if task.name in ds.masks
                            else ds.targets[task.name] for ds in fitted]).double()
        mean = float(values.mean()) if values.numel() else 0.0
        std = float(values.std()) if values.numel() > 1 else 0.0
        std = std if math.isfinite(std) and std > 0 else 1.0  # a constant target: centre only
        for data in (train, *others):
            for ds in sets(data):
                if task.name in ds.targets:
                    ds.targets[task.name] = ((ds.targets[task.name].double() - mean) / std).to(ds.targets[task.name].dtype)
        out.append(dataclasses.replace(task, target_scaling=(mean, std)))
    return out
