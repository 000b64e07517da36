"""Accumulate per-task metrics and mean losses over an epoch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from polytask.core.task import Task
from polytask.metrics.registry import METRICS


class TaskMetrics:
    """Per-task torchmetrics objects plus a running mean of each task's loss."""

    def __init__(self, tasks: Sequence[Task], device: torch.device | str = "cpu") -> None:
        self.tasks = {t.name: t for t in tasks}
        self.metrics = {t.name: {k: m.to(device) for k, m in METRICS.build(t).items()} for t in tasks}
        self.reset()

    def reset(self) -> None:
        for group in self.metrics.values():
            for m in group.values():
                m.reset()
        self._loss_sum: dict[str, float] = {t: 0.0 for t in self.tasks}
        self._loss_n: dict[str, int] = {t: 0 for t in self.tasks}
        self._losses: dict[str, list[Tensor]] = {t: [] for t in self.tasks}

    @torch.no_grad()
    def update(self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], masks: Mapping[str, Tensor],
               losses: Mapping[str, Tensor | None] | None = None) -> None:
        for name, out in outputs.items():
            task = self.tasks[name]
            y = targets[name]
            mask = masks.get(name)
            if mask is not None and not bool(mask.all()):
                out, y = out[mask], y[mask]
            if len(y) == 0:
                continue
            pred = out.float()
            if task.kind in ("binary", "multilabel"):
                pred, y = torch.sigmoid(pred), y.long()
            for metric in self.metrics[name].values():
                metric.update(pred, y)
            if losses is not None and losses.get(name) is not None:
                # keep tensors and sum at compute(): avoids a device sync every step
                self._losses[name].append(losses[name].detach() * len(y))  # type: ignore[union-attr]
                self._loss_n[name] += len(y)

    def compute(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for name, group in self.metrics.items():
            values: dict[str, float] = {}
            if self._loss_n[name]:
                values["loss"] = float(torch.stack(self._losses[name]).sum()) / self._loss_n[name]
            if any(m.update_count for m in group.values()):
                for metric_name, metric in group.items():
                    values[metric_name] = float(metric.compute())
            out[name] = values
        return out
