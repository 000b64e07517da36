"""Dynamic Task Prioritization (DTP)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._weighting import PerTaskMethod, check_tasks
from polytask.methods.base import Step, check_positive, register

#: Metrics where lower is better: never a DTP key performance indicator.
LOWER_IS_BETTER = ("loss", "mse", "rmse", "mae", "error", "err", "nll", "brier", "log_loss")
#: Higher-is-better metrics that can leave [0, 1]: a KPI only when named in ``kpis``.
UNBOUNDED = ("r2",)
#: Floor of κ inside the logarithm.
KPI_FLOOR = 1e-6


@register("dtp")
class DTP(PerTaskMethod):
    """Dynamic task prioritization — Guo, Haque, Huang, Yeung & Fei-Fei, "Dynamic Task
    Prioritization for Multitask Learning", ECCV 2018 (task-level prioritisation).

        wᵢ = FL(κ̄ᵢ, γ) = −(1 − κ̄ᵢ)^γ log κ̄ᵢ,   κ̄ᵢ ← ema · κ̄ᵢ + (1 − ema) · κᵢ

    κᵢ is task i's key performance indicator on the validation set (a metric in [0, 1], higher is
    better, e.g. accuracy), read in ``on_epoch_end``; the paper's smoothing α is 1 − ``ema``. Hard
    tasks (low κ̄) get large weights, mastered ones tend to 0. ``kpis`` maps a task to its metric
    name; by default the first metric reported for the task that is neither lower-is-better
    (loss, rmse, mae, …) nor unbounded (r2), e.g. accuracy. A task weighs 1 until its KPI is
    known; a KPI outside [0, 1] is an error. κ̄ is floored at 1e-6 inside the log.
    """

    needs = "losses"
    stateful = True

    def __init__(self, *, gamma: float = 2.0, ema: float = 0.5, kpis: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.gamma = check_positive("dtp", "gamma", gamma, allow_zero=True)
        if not (isinstance(ema, (int, float)) and not isinstance(ema, bool) and 0 <= ema < 1):
            raise InvalidParameterError(f"`ema` of `dtp` must be in [0, 1); found {ema!r}")
        self.ema = float(ema)
        self.kpis = dict(kpis or {})
        for task, metric in self.kpis.items():
            if not isinstance(metric, str) or metric.lower() in LOWER_IS_BETTER:
                raise InvalidParameterError(
                    f"`kpis['{task}']` of `dtp` must name a higher-is-better metric in [0, 1] (e.g. 'accuracy'); "
                    f"found {metric!r}")
        self.register_buffer("kappa", torch.empty(0, dtype=torch.float64))
        self._remember(gamma=gamma, ema=ema, kpis=self.kpis)

    def reset_state(self, num_tasks: int) -> None:
        check_tasks(self, "kpis", list(self.kpis), self.all_tasks)
        self.kappa = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def on_epoch_end(self, epoch: int, train_losses: Mapping[str, float],
                     val_metrics: Mapping[str, Mapping[str, float]] | None = None) -> None:
        if getattr(self, "all_tasks", None) is None:
            self.setup(list(train_losses))
        for i, task in enumerate(self.all_tasks):
            metrics = (val_metrics or {}).get(task)
            if metrics:
                value = self._kpi(task, metrics)
                old = float(self.kappa[i])
                self.kappa[i] = value if math.isnan(old) else self.ema * old + (1 - self.ema) * value

    def _kpi(self, task: str, metrics: Mapping[str, float]) -> float:
        usable = [m for m in metrics if m.lower() not in LOWER_IS_BETTER + UNBOUNDED]
        if task not in self.kpis and not usable:
            raise InvalidParameterError(
                f"`dtp` found no metric of task '{task}' usable as a KPI in [0, 1], higher is better, among "
                f"{list(metrics)}; name one with kpis={{'{task}': ...}}")
        name = self.kpis.get(task, usable[0] if usable else "")
        if name not in metrics:
            raise InvalidParameterError(
                f"`dtp` KPI '{name}' of task '{task}' is not among its metrics {list(metrics)}; set `kpis`")
        value = float(metrics[name])
        if name.lower() in LOWER_IS_BETTER or not 0 <= value <= 1:
            raise InvalidParameterError(
                f"`dtp` needs a higher-is-better KPI in [0, 1] for task '{task}'; its metric '{name}' is {value!r}. "
                f"Choose one with kpis={{'{task}': 'accuracy'}} (or another [0, 1] score)")
        return value

    def weights(self, step: Step) -> Tensor:
        kappa = self.kappa[self.index(step)]
        focal = -(1 - kappa).pow(self.gamma) * kappa.clamp_min(KPI_FLOOR).log()
        return torch.where(torch.isnan(kappa), torch.ones_like(kappa), focal).to(step.losses)
