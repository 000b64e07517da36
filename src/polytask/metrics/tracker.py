"""Accumulate per-task metrics and mean losses over an epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torchmetrics
from torch import Tensor
from torchmetrics.regression import R2Score

from polytask.core.task import Task
from polytask.engine.comm import all_reduce_sum_
from polytask.metrics.registry import METRICS


class TaskMetrics:
    """Per-task torchmetrics objects plus a running mean of each task's loss."""

    def __init__(self, tasks: Sequence[Task], device: torch.device | str = "cpu") -> None:
        self.tasks = {t.name: t for t in tasks}
        self.metrics = {t.name: {k: _unchecked(m).to(device) for k, m in METRICS.build(t).items()} for t in tasks}
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
                pred = out.float()
                if task.kind == "regression":  # metrics in the target's units (standardised targets are unscaled)
                    pred, y = task.unscale(pred), task.unscale(y)
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
                pred, y = torch.cat([p for p, _ in pending]), torch.cat([t for _, t in pending])
                if self.tasks[name].kind in ("binary", "multilabel"):
                    y = y.long()
                for metric in self.metrics[name].values():
                    metric.update(pred, y)
                pending.clear()
        self._pending_elements = 0

    def state_dict(self) -> dict[str, Any]:
        """The partial accumulation (so a run resumed mid-epoch reports the same epoch metrics)."""
        self._flush()
        metrics = {name: {metric_name: {"state": dict(metric.metric_state), "count": metric.update_count}
                          for metric_name, metric in group.items()} for name, group in self.metrics.items()}
        return {"metrics": metrics, "loss_n": dict(self._loss_n),
                "losses": {t: [v.cpu() for v in self._loss_sums(t)] for t in self._losses}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, group in state["metrics"].items():
            for metric_name, saved in group.items():
                metric = self.metrics[name][metric_name]
                for key, value in saved["state"].items():
                    setattr(metric, key, value.to(metric.device) if isinstance(value, Tensor)
                            else [v.to(metric.device) for v in value])
                metric._update_count = saved["count"]
                metric._computed = None
        self._loss_n = dict(state["loss_n"])
        self._losses = {t: list(vs) for t, vs in state["losses"].items()}  # saved as products Lᵢ·nᵢ
        self._loss_rows = {t: [1] * len(vs) for t, vs in self._losses.items()}
        self._pending = {t: [] for t in self.tasks}
        self._pending_elements = 0

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
        # per task: Σ Lᵢnᵢ, Σ nᵢ, the metrics' updates and R²'s samples. Summed over ranks before anything is
        # decided from them: a metric's compute is a collective, so every rank must call it or none
        # (a task labelled on one rank only had the other rank skip it, and the first waited for good)
        sums = torch.tensor([[float(torch.stack(self._loss_sums(t)).sum()) if self._losses[t] else 0.0,
                              float(self._loss_n[t]), float(sum(m.update_count for m in self.metrics[t].values())),
                              float(sum(int(m.total) for m in self.metrics[t].values() if isinstance(m, R2Score)))]
                             for t in names], dtype=torch.float64).reshape(len(names), 4)
        if dist.is_available() and dist.is_initialized():
            all_reduce_sum_(sums)
        out: dict[str, dict[str, float]] = {}
        for i, (name, group) in enumerate(self.metrics.items()):
            values: dict[str, float] = {}
            if sums[i, 1] > 0:
                values["loss"] = float(sums[i, 0] / sums[i, 1])
            if sums[i, 2] > 0:
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


def _unchecked(metric: torchmetrics.Metric) -> torchmetrics.Metric:
    """A torchmetrics classification metric without its per-call input validation: the targets
    were validated once with the data (``Task.check_targets``) and the predictions are the
    tracker's own (probabilities, logits), so the checks (a ``torch.unique`` of the targets at every
    update and compute) would only repeat that at every flush. Values are unchanged."""
    if type(metric).__module__.startswith(("torchmetrics.", "polytask.metrics.")) and hasattr(metric, "validate_args"):
        metric.validate_args = False
    return metric
