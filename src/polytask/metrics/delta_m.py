"""Δm: the average relative change of a multi-task model against single-task baselines."""

from __future__ import annotations

from collections.abc import Mapping

from polytask.core.errors import InvalidParameterError
from polytask.metrics.registry import METRICS


def delta_m(mtl: Mapping[str, Mapping[str, float]], stl: Mapping[str, Mapping[str, float]],
            main_metrics: Mapping[str, str]) -> float:
    """Δm% = (1/T) Σᵢ (−1)^{lᵢ} (Mᵢ − Mᵢ^STL) / Mᵢ^STL · 100 (Maninis et al., CVPR 2019;
    Vandenhende et al., TPAMI 2021), over each task's main metric, lᵢ = 1 when lower is better.

    Positive values mean the multi-task model is better than single-task training on average.
    """
    terms = []
    for task, metric in main_metrics.items():
        if task not in mtl or metric not in mtl[task]:
            raise InvalidParameterError(f"Δm: no '{metric}' for task '{task}' in the multi-task results")
        if task not in stl or metric not in stl[task]:
            raise InvalidParameterError(f"Δm: no '{metric}' for task '{task}' in the single-task baselines")
        base = stl[task][metric]
        if base == 0:
            raise InvalidParameterError(f"Δm: single-task '{metric}' of task '{task}' is 0; relative change undefined")
        sign = 1.0 if METRICS.higher_is_better(metric) else -1.0
        terms.append(sign * (mtl[task][metric] - base) / abs(base))
    if not terms:
        raise InvalidParameterError("Δm needs at least one task")
    return 100.0 * sum(terms) / len(terms)
