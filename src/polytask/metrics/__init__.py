"""Per-task metrics (torchmetrics) and Δm against single-task baselines."""

from polytask.metrics.delta_m import delta_m
from polytask.metrics.registry import METRICS, MetricSpec, register_metric
from polytask.metrics.tracker import TaskMetrics

__all__ = ["METRICS", "MetricSpec", "TaskMetrics", "delta_m", "register_metric"]
