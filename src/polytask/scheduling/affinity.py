"""Affinity-driven task scheduling: train together only the tasks whose measured affinity says they help each other."""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from polytask.scheduling.base import TASK_SCHEDULERS, TaskScheduler, check_param, is_count, is_number


@TASK_SCHEDULERS.register("affinity")
class AffinityScheduler(TaskScheduler):
    """Steps cycle through the best split of the tasks into at most ``groups`` groups by measured TAG affinity.

    The affinity is TAG's lookahead Z_{i→j} = 1 − L_j(θ′ᵢ)/L_j(θ) (Fifty et al., "Efficiently
    Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021), measured during this
    run by the ``diagnostics`` callback (``callbacks: [{name: diagnostics, affinity_every: k}]``),
    which hands every measurement to this scheduler (``observe_affinity``). Each pair keeps an
    exponential moving average Z̄ (``smoothing``; 0: the last value). The available tasks are
    split as ``polytask.diagnostics.grouping.best_grouping`` does (the paper's score: the mean
    affinity onto a task from the other members of its group), and the steps between two
    affinity steps train one group each, in turn: tasks that lower each other's loss step
    together, tasks that raise it step apart. Affinity steps (every k-th step) train every
    available task, so the whole matrix keeps being measured; until the first measurement, and
    with probability ``exploration`` at any step, every available task trains too.

    This is a scheduler built on TAG's measurement and grouping score, not an algorithm of the
    paper, which trains each group as a separate network after a measuring run
    (``polytask inspect RUN_DIR --groups B --write-configs DIR`` does that).
    """

    def __init__(self, *, groups: int = 2, smoothing: float = 0.9, exploration: float = 0.0) -> None:
        check_param(is_count(groups), "groups", "affinity", "an int >= 1", groups)
        check_param(is_number(smoothing) and 0 <= smoothing < 1, "smoothing", "affinity", "in [0, 1)", smoothing)
        check_param(is_number(exploration) and 0 <= exploration <= 1, "exploration", "affinity", "in [0, 1]", exploration)
        self.groups, self.smoothing, self.exploration = groups, float(smoothing), float(exploration)
        self.every = 0  # the diagnostics callback's affinity_every, set when it starts

    def setup(self, tasks: Sequence[str]) -> None:
        super().setup(tasks)
        self.affinity: dict[str, dict[str, float]] = {}
        self.turn = 0
        self.measured = 0
        self._warned = False

    def observe_affinity(self, step: int, tasks: Sequence[str], z: Sequence[Sequence[float]]) -> None:
        """One affinity measurement: ``z[i][j]`` is the affinity of ``tasks[i]`` onto ``tasks[j]`` (NaN: not measured)."""
        self.measured += 1
        for i, source in enumerate(tasks):
            for j, target in enumerate(tasks):
                value = float(z[i][j])
                if i == j or not math.isfinite(value):
                    continue
                row = self.affinity.setdefault(source, {})
                row[target] = value if target not in row else self.smoothing * row[target] + (1 - self.smoothing) * value

    def split(self, available: Sequence[str]) -> list[list[str]]:
        """The best split of ``available`` by the smoothed affinity (one group while a pair is unmeasured)."""
        from polytask.diagnostics.grouping import best_grouping

        tasks = list(available)
        matrix = [[0.0 if a == b else self.affinity.get(a, {}).get(b, math.nan) for b in tasks] for a in tasks]
        if len(tasks) < 2 or any(math.isnan(v) for row in matrix for v in row):
            return [tasks]
        return [list(g) for g in best_grouping(matrix, tasks, min(self.groups, len(tasks))).groups]

    def select(self, step: int, available: Sequence[str], generator: torch.Generator) -> list[str]:
        if not available:
            return []
        explore = self.exploration > 0 and float(torch.rand((), generator=generator, dtype=torch.float64)) < self.exploration
        if self.measured == 0 and step >= 1000 and not self._warned:
            self._warned = True
            warnings.warn("the affinity task scheduler has received no affinity measurement in 1000 steps, so it trains every "
                          "task; add callbacks: [{name: diagnostics, affinity_every: 10}]", stacklevel=2)
        if explore or self.measured == 0 or (self.every and step % self.every == 0):
            return list(available)
        groups = self.split(available)
        chosen = groups[self.turn % len(groups)]
        self.turn += 1
        return chosen

    def state_dict(self) -> dict:
        return {"affinity": {s: dict(row) for s, row in self.affinity.items()}, "turn": self.turn,
                "measured": self.measured}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.affinity = {s: {t: float(v) for t, v in row.items()} for s, row in state["affinity"].items()}
        self.turn, self.measured = int(state["turn"]), int(state["measured"])

    def __repr__(self) -> str:
        return f"AffinityScheduler(groups={self.groups}, smoothing={self.smoothing}, exploration={self.exploration})"
