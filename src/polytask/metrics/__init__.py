"""Per-task metrics (torchmetrics) and Δm against single-task baselines."""

from typing import Any

from polytask.metrics.delta_m import delta_m
from polytask.metrics.registry import METRICS, MetricSpec, register_metric

__all__ = ["METRICS", "MetricSpec", "TaskMetrics", "delta_m", "register_metric"]


def __getattr__(name: str) -> Any:
    # the tracker imports torchmetrics (seconds); reading the registry or Δm does not need it
    if name == "TaskMetrics":
        from polytask.metrics.tracker import TaskMetrics

        return TaskMetrics
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
