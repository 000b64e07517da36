"""Gradient conflict from a Gramian: pairwise task cosines, gradient norms and their ratios.

With task gradients gᵢ on the shared parameters θ and the Gramian G = J Jᵀ (Gᵢⱼ = ⟨gᵢ, gⱼ⟩) the
engine already computed for a gradient method (or on the health monitor's ``diagnose`` steps),

    ‖gᵢ‖ = √Gᵢᵢ,    cos(gᵢ, gⱼ) = Gᵢⱼ / (‖gᵢ‖ ‖gⱼ‖),

so the statistics cost no backward pass of their own. A pair conflicts when its cosine is
negative (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, call such
gradients conflicting). The norm ratio of task i at a step is ‖gᵢ‖ / mean over the step's tasks of
‖gⱼ‖: 1 for every task when no task dominates the update's scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.core.errors import ShapeError


def check_gramian(gramian: Tensor, tasks: Sequence[str]) -> Tensor:
    """``gramian`` as a float64 CPU tensor, after checking it is square with one row per task."""
    if not isinstance(gramian, Tensor) or gramian.dim() != 2 or gramian.shape[0] != gramian.shape[1]:
        shape = tuple(gramian.shape) if isinstance(gramian, Tensor) else type(gramian).__name__
        raise ShapeError(f"a Gramian must be a square T×T tensor; found {shape}")
    if gramian.shape[0] != len(tasks):
        raise ShapeError(f"the Gramian is {gramian.shape[0]}×{gramian.shape[0]} but {len(tasks)} tasks were named "
                         f"({', '.join(tasks)})")
    return gramian.detach().to("cpu", torch.float64)


def norms(gramian: Tensor) -> Tensor:
    """‖gᵢ‖ = √Gᵢᵢ (negative round-off on the diagonal counts as 0)."""
    return gramian.diagonal().clamp_min(0).sqrt()


def cosines(gramian: Tensor) -> Tensor:
    """cos(gᵢ, gⱼ) = Gᵢⱼ / (‖gᵢ‖‖gⱼ‖); NaN in the rows and columns of tasks with a zero gradient."""
    n = norms(gramian)
    outer = n[:, None] * n[None, :]
    out = gramian / outer
    return torch.where(outer > 0, out, torch.full_like(out, math.nan)).clamp(-1.0, 1.0)


class ConflictStats:
    """Running conflict statistics per epoch, fed one Gramian per step.

    Steps may train different subsets of the tasks (per-task data sets, task schedulers): every
    pair is averaged over the steps that trained both, every norm ratio over the steps that
    trained the task.
    """

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.epochs: dict[int, dict[str, Any]] = {}

    def _epoch(self, epoch: int) -> dict[str, Any]:
        if epoch not in self.epochs:
            t = len(self.tasks)
            self.epochs[epoch] = {"cos_sum": [[0.0] * t for _ in range(t)], "cos_count": [[0] * t for _ in range(t)],
                                  "conflicts": 0, "pairs": 0, "ratio_sum": [0.0] * t, "ratio_count": [0] * t,
                                  "steps": 0}
        return self.epochs[epoch]

    def add(self, epoch: int, tasks: Sequence[str], gramian: Tensor) -> dict[str, Any]:
        """Record one step; returns its cosines and norms by task name (for per-step logs)."""
        unknown = [t for t in tasks if t not in self.index]
        if unknown:
            raise ShapeError(f"tasks {unknown} are not among the diagnosed tasks {self.tasks}")
        g = check_gramian(gramian, tasks)
        cos, n = cosines(g), norms(g)
        acc = self._epoch(epoch)
        acc["steps"] += 1
        mean_norm = float(n.mean()) if len(tasks) else 0.0
        for a, ta in enumerate(tasks):
            i = self.index[ta]
            if mean_norm > 0:
                acc["ratio_sum"][i] += float(n[a]) / mean_norm
                acc["ratio_count"][i] += 1
            for b, tb in enumerate(tasks):
                value = float(cos[a, b])
                if a == b or not math.isfinite(value):
                    continue
                j = self.index[tb]
                acc["cos_sum"][i][j] += value
                acc["cos_count"][i][j] += 1
                if a < b:
                    acc["pairs"] += 1
                    acc["conflicts"] += value < 0
        return {"cosine": {f"{tasks[a]}~{tasks[b]}": float(cos[a, b]) for a in range(len(tasks))
                           for b in range(a + 1, len(tasks))},
                "norm": {t: float(n[a]) for a, t in enumerate(tasks)}}

    def summary(self) -> dict[str, Any]:
        """Per epoch and over all epochs: mean cosine matrix (None where a pair never met, 1 on the
        diagonal), fraction of conflicting pair-steps, mean norm ratio per task, steps seen."""
        per_epoch = {str(e): self._summarise([acc]) for e, acc in sorted(self.epochs.items())}
        return {"tasks": self.tasks, "per_epoch": per_epoch, "overall": self._summarise(list(self.epochs.values()))}

    def _summarise(self, accs: list[dict[str, Any]]) -> dict[str, Any]:
        t = len(self.tasks)
        matrix: list[list[float | None]] = [[None] * t for _ in range(t)]
        for i in range(t):
            for j in range(t):
                s = sum(a["cos_sum"][i][j] for a in accs)
                c = sum(a["cos_count"][i][j] for a in accs)
                matrix[i][j] = 1.0 if i == j else (s / c if c else None)
        pairs = sum(a["pairs"] for a in accs)
        ratio = {}
        for i, task in enumerate(self.tasks):
            c = sum(a["ratio_count"][i] for a in accs)
            ratio[task] = sum(a["ratio_sum"][i] for a in accs) / c if c else None
        return {"mean_cosine": matrix, "conflict_fraction": sum(a["conflicts"] for a in accs) / pairs if pairs else None,
                "norm_ratio": ratio, "steps": sum(a["steps"] for a in accs)}

    def state_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "epochs": {str(k): v for k, v in self.epochs.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epochs = {int(k): dict(v) for k, v in state["epochs"].items()}
