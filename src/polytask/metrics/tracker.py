"""Accumulate per-task metrics and mean losses over an epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torchmetrics
from torch import Tensor
from torchmetrics.classification import MulticlassPrecisionRecallCurve
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score

from polytask.core.task import Task
from polytask.engine.comm import all_reduce_sum_
from polytask.metrics import r2
from polytask.metrics.registry import METRICS

#: the kinds whose predictions the tracker checks and converts at a flush (see ``TaskMetrics``)
_TABULAR = ("regression", "binary", "multiclass", "multilabel")


class TaskMetrics:
    """Per-task torchmetrics objects plus a running mean of each task's loss.

    What each metric receives is listed in :mod:`polytask.metrics.registry`. Predictions are
    converted once per flush, not per metric: the labels ``p > threshold`` for torchmetrics'
    thresholded binary and multilabel metrics and the softmax for its multiclass ranking metrics,
    so that torchmetrics' "any value outside [0, 1] → apply a sigmoid / softmax" rule never decides
    on a whole flush (one NaN re-applied a sigmoid to every probability of the flush: accuracy 1.0
    became 0.3), and float64 values for the built-in regression metrics.

    NaN predictions. A labelled row whose prediction is NaN (regression, binary, multilabel: any
    value; multiclass: any logit NaN, a +inf logit or all logits −inf, where no softmax exists)
    makes every metric of its task NaN for the epoch (or evaluation), whichever the metric, on
    every rank: the mean loss of such a batch is NaN too, and a broken output should be seen
    rather than scored as some class. The row reaches the metrics as zeros (their states stay
    finite and nothing in them reinterprets the flush); the other tasks are unaffected. Rows
    without a label are never looked at. (Vision and text kinds hand their outputs on as they are.)
    """

    def __init__(self, tasks: Sequence[Task], device: torch.device | str = "cpu") -> None:
        self.tasks = {t.name: t for t in tasks}
        self.metrics = {t.name: {k: _unchecked(m).to(device) for k, m in METRICS.build(t).items()} for t in tasks}
        # per task and metric, the form of the predictions it receives (decided once: see ``_input_form``)
        self._forms = {name: {k: _input_form(self.tasks[name], m) for k, m in group.items()}
                       for name, group in self.metrics.items()}
        self.reset()

    #: buffered prediction values before they are handed to torchmetrics in one call per metric
    #: (16 MB of float32: an epoch of a small data set is one call, a large one stays bounded)
    FLUSH_ELEMENTS = 1 << 22

    def reset(self) -> None:
        for group in self.metrics.values():
            for m in group.values():
                m.reset()
        self._loss_n: dict[str, int] = {t: 0 for t in self.tasks}
        self._losses: dict[str, list[Tensor]] = {t: [] for t in self.tasks}
        self._loss_rows: dict[str, list[int]] = {t: [] for t in self.tasks}  # the labelled rows of each loss
        self._pending: dict[str, list[tuple[Tensor, Tensor]]] = {t: [] for t in self.tasks}
        self._pending_elements = 0
        # labelled rows with a NaN prediction (a device tensor once a flush saw the task: no sync per flush)
        self._nan_rows: dict[str, Tensor | int] = {t: 0 for t in self.tasks}

    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], masks: Mapping[str, Tensor],
               losses: Mapping[str, Tensor | None] | None = None) -> None:
        """Record a batch. Predictions and targets are buffered and handed to torchmetrics once
        ``FLUSH_ELEMENTS`` values are waiting (and before ``compute`` / ``state_dict``): a
        torchmetrics update costs ~0.1 ms of Python per metric, which on a small model is a third
        of a training step. The flush points depend only on the data seen, so a resumed run
        flushes where the uninterrupted one did.

        The outputs are detached rather than read under ``torch.no_grad()``: the same kernels, without
        a grad-mode context per step (a twentieth of the Trainer's own cost on a small model)."""
        for name, out in outputs.items():
            task = self.tasks[name]
            out = out.detach()
            y = targets[name]
            mask = masks.get(name)
            if mask is not None and not bool(mask.all()):
                out, y = out[mask], y[mask]
            rows = y.shape[0]  # not len(): Tensor.__len__ is a Python function, called per task and step
            if rows == 0:
                continue
            if task.kind in ("binary", "multilabel"):
                # a new tensor without a graph (detached); the sigmoid per batch (on a concatenation its
                # vectorised and scalar code paths would round some values differently); the targets'
                # cast is exact, so it waits for the flush
                pred = torch.sigmoid(out.float())
            else:
                pred = out.float()  # regression: unscaled at the flush, in float64
            self._pending[name].append((pred, y))
            self._pending_elements += pred.numel()
            loss = None if losses is None else losses.get(name)
            if loss is not None:
                # keep tensors and sum at compute(): avoids a device sync every step; the products
                # Lᵢ·nᵢ are formed there, the same float operations in one call
                self._losses[name].append(loss.detach())
                self._loss_rows[name].append(rows)
                self._loss_n[name] += rows
        if self._pending_elements >= self.FLUSH_ELEMENTS:
            self._flush()

    @torch.no_grad()
    def _flush(self) -> None:
        for name, pending in self._pending.items():
            if pending:
                task = self.tasks[name]
                pred, y = torch.cat([p for p, _ in pending]), torch.cat([t for _, t in pending])
                if task.kind in ("binary", "multilabel"):
                    y = y.long()
                if task.kind in _TABULAR:
                    pred = self._screen(name, pred)
                inputs = self._inputs(name, pred, y)
                for metric_name, metric in self.metrics[name].items():
                    metric.update(*inputs[self._forms[name][metric_name]])
                pending.clear()
        self._pending_elements = 0

    def _screen(self, name: str, pred: Tensor) -> Tensor:
        """``pred`` (a new tensor: the flush's concatenation) with its NaN rows set to 0, their
        count added to ``name``'s (tensor operations only: no device sync)."""
        if self.tasks[name].kind == "multiclass":
            # NaN anywhere, a +inf maximum or an all −inf row: argmax or softmax is undefined
            bad = torch.isnan(pred).any(1) | torch.isinf(pred.amax(1))
            pred.masked_fill_(bad.unsqueeze(1), 0.0)
        else:
            bad = torch.isnan(pred)
            pred.masked_fill_(bad, 0.0)
            if bad.dim() > 1:  # multilabel: a row counts once
                bad = bad.any(1)
        self._nan_rows[name] = self._nan_rows[name] + bad.sum()
        return pred

    def _inputs(self, name: str, pred: Tensor, y: Tensor) -> dict[tuple[Any, ...], tuple[Tensor, Tensor]]:
        """The (prediction, target) pairs ``name``'s metrics take, by form, each built once."""
        task, out = self.tasks[name], {}
        for form in set(self._forms[name].values()):
            if form[0] == "raw":
                out[form] = (task.unscale(pred), task.unscale(y)) if task.kind == "regression" else (pred, y)
            elif form[0] == "float64":
                out[form] = (task.unscale(pred.double()), task.unscale(y.double()))
            elif form[0] == "softmax":
                out[form] = (pred.softmax(1), y)
            else:  # ("labels", T): what torchmetrics forms from probabilities, without its sigmoid rule
                out[form] = (pred > form[1], y)
        return out

    def state_dict(self) -> dict[str, Any]:
        """The partial accumulation (so a run resumed mid-epoch reports the same epoch metrics)."""
        self._flush()
        # copies: the metrics keep adding to their state tensors in place after this
        metrics = {name: {metric_name: {"state": {k: _copy(v) for k, v in metric.metric_state.items()},
                                        "count": metric.update_count}
                          for metric_name, metric in group.items()} for name, group in self.metrics.items()}
        return {"metrics": metrics, "loss_n": dict(self._loss_n),
                "losses": {t: [v.cpu() for v in self._loss_sums(t)] for t in self._losses},
                "nan_rows": {t: int(v) for t, v in self._nan_rows.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, group in state["metrics"].items():
            for metric_name, saved in group.items():
                metric = self.metrics[name][metric_name]
                for key, value in saved["state"].items():
                    # copies (a state dict loaded into two trackers must not make them share tensors),
                    # in the state's own dtype (R²'s float64 sums from a checkpoint of float32 ones)
                    current = getattr(metric, key)
                    dtype = current.dtype if isinstance(current, Tensor) and isinstance(value, Tensor) else None
                    setattr(metric, key, _copy(value, metric.device, dtype))
                metric._update_count = saved["count"]
                metric._computed = None
        self._loss_n = dict(state["loss_n"])
        self._losses = {t: list(vs) for t, vs in state["losses"].items()}  # saved as products Lᵢ·nᵢ
        self._loss_rows = {t: [1] * len(vs) for t, vs in self._losses.items()}
        self._pending = {t: [] for t in self.tasks}
        self._pending_elements = 0
        self._nan_rows = {t: int(state.get("nan_rows", {}).get(t, 0)) for t in self.tasks}

    def _loss_sums(self, name: str) -> list[Tensor]:
        """Each recorded batch's loss times its labelled rows, Lᵢ·nᵢ (one multiplication per
        batch, the same float32 products as multiplying every step)."""
        losses = self._losses[name]
        if not losses:
            return []
        values = torch.stack(losses)
        rows = torch.tensor(self._loss_rows[name], dtype=values.dtype, device=values.device)
        return list((values * rows).unbind())

    def _empty_update(self, name: str) -> None:
        """Give ``name``'s metrics that keep lists of samples (AUROC's predictions and targets) an
        empty entry in the dtypes the other ranks' entries have. Why: torchmetrics gathers a rank's
        empty list as float32, which does not gather with another rank's int64 targets (gloo aborts
        the run); its metrics do not take an update of no sample (a reshape of 0 elements fails).
        Metrics that keep sums gather their zeros as they are."""
        group = self.metrics[name]
        rows = _empty_rows(self.tasks[name], next(iter(group.values())).device)
        if rows is None:
            return
        pred, target = rows
        for metric in group.values():
            for attr in metric._reductions:
                value = getattr(metric, attr)
                if isinstance(value, list) and not value:
                    value.append(target if attr == "target" else pred)

    def compute(self) -> dict[str, dict[str, float]]:
        """Epoch values; under torch.distributed, summed over ranks (torchmetrics syncs itself)."""
        self._flush()
        names = list(self.metrics)
        # per task: Σ Lᵢnᵢ, Σ nᵢ, the metrics' updates, R²'s samples and the rows with a NaN prediction.
        # Summed over ranks before anything is decided from them: a metric's compute is a collective, so
        # every rank must call it or none (a task labelled on one rank only had the other rank skip it,
        # and the first waited for good)
        sums = torch.tensor([[float(torch.stack(self._loss_sums(t)).sum()) if self._losses[t] else 0.0,
                              float(self._loss_n[t]), float(sum(m.update_count for m in self.metrics[t].values())),
                              float(sum(int(m.total) for m in self.metrics[t].values() if isinstance(m, R2Score))),
                              float(self._nan_rows[t])]
                             for t in names], dtype=torch.float64).reshape(len(names), 5)
        if dist.is_available() and dist.is_initialized():
            all_reduce_sum_(sums)
        out: dict[str, dict[str, float]] = {}
        for i, (name, group) in enumerate(self.metrics.items()):
            values: dict[str, float] = {}
            if sums[i, 1] > 0:
                values["loss"] = float(sums[i, 0] / sums[i, 1])
            if sums[i, 2] > 0 and sums[i, 4] > 0:  # a NaN prediction on some rank: see the class docstring
                values.update(dict.fromkeys(group, float("nan")))
            elif sums[i, 2] > 0:
                if not any(m.update_count for m in group.values()):
                    self._empty_update(name)
                for metric_name, metric in group.items():
                    if isinstance(metric, R2Score) and int(sums[i, 3]) < 2:
                        values[metric_name] = float("nan")  # R² is undefined for fewer than two samples
                        continue
                    values[metric_name] = float(metric.compute())
            out[name] = values
        return out


def _empty_rows(task: Task, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """Predictions and targets of no sample, in the shapes and dtypes the tracker hands ``task``'s
    metrics (None for a kind it does not track this way)."""
    if task.kind not in ("regression", "binary", "multiclass", "multilabel"):
        return None
    wide = task.kind in ("multiclass", "multilabel")
    pred = torch.zeros((0, task.num_classes) if wide else (0,), device=device)
    target = torch.zeros((0, task.num_classes) if task.kind == "multilabel" else (0,), device=device,
                         dtype=torch.float32 if task.kind == "regression" else torch.long)
    return pred, target


def _input_form(task: Task, metric: torchmetrics.Metric) -> tuple[Any, ...]:
    """What the tracker hands ``metric`` of ``task``: ``("labels", T)`` (bool ``p > T``) for a
    torchmetrics binary or multilabel classification metric with a threshold T, ``("softmax",)``
    for a multiclass torchmetrics precision-recall-curve metric (AUROC, average precision, ROC),
    ``("float64",)`` for the built-in regression metrics (MSE and MAE add to their float32 sums in
    place, R²'s sums are float64; another metric's float32 state could turn float64 on some ranks
    only, which torch.distributed does not gather), ``("raw",)`` (the documented inputs) otherwise."""
    if task.kind in ("binary", "multilabel"):
        threshold = getattr(metric, "threshold", None)
        if (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                and any(c.__module__.startswith("torchmetrics.classification.") for c in type(metric).__mro__)):
            return ("labels", float(threshold))
    if task.kind == "multiclass" and isinstance(metric, MulticlassPrecisionRecallCurve):
        return ("softmax",)
    if task.kind == "regression" and (isinstance(metric, r2.R2Score) or type(metric) in (MeanSquaredError,
                                                                                       MeanAbsoluteError)):
        return ("float64",)
    return ("raw",)


def _copy(value: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """A metric state (a tensor or a list of tensors) copied, on ``device`` and in ``dtype`` if given."""
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype, copy=True)
    return [v.to(device=device, copy=True) for v in value]


def _unchecked(metric: torchmetrics.Metric) -> torchmetrics.Metric:
    """A torchmetrics classification metric without its per-call input validation: the targets
    were validated once with the data (``Task.check_targets``) and the predictions are the
    tracker's own (probabilities, logits, thresholded labels, softmax probabilities), so the
    checks (a ``torch.unique`` of the targets at every update and compute) would only repeat that
    at every flush. Values are unchanged."""
    if type(metric).__module__.startswith(("torchmetrics.", "polytask.metrics.")) and hasattr(metric, "validate_args"):
        metric.validate_args = False
    return metric
