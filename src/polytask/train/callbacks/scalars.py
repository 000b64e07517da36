"""What the TensorBoard and MLflow loggers log, and at which step; each says how one value is written.

Per step (every ``every`` steps): ``loss/TASK`` and ``weight/TASK``. Per epoch, at the epoch's
last step: ``SPLIT/TASK/METRIC`` and ``lr/groupI`` (the rates the epoch trained with: a scheduler
has already moved the optimizer's). Gradient health ``health/KIND/NAME`` at the rows' own steps,
each row once. At the end, ``final/TASK/METRIC`` and ``final/delta_m``.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any

from polytask.train.callbacks.base import Callback, TrainStep

if TYPE_CHECKING:
    from polytask.train.trainer import Trainer


def new_health_rows(rows: list[dict[str, Any]], after: int) -> list[dict[str, Any]]:
    """The rows whose step is past ``after``, in their order.

    The monitor appends rows in step order, so the scan walks back from the end and stops at the
    first old row: each call costs the new rows only, however long the run's list has grown."""
    start = len(rows)
    while start > 0 and int(rows[start - 1]["step"]) > after:
        start -= 1
    return rows[start:]


class ScalarLogger(Callback, abc.ABC):
    """Subclasses set ``every``, ``_health_step`` (in ``on_fit_start``) and implement
    :meth:`_active` and :meth:`_scalar`; :meth:`_flush` is called at every epoch end."""

    every: int = 1
    _health_step: int = -1
    _last_step: int | None = None
    _lrs: list[float] | None = None

    @abc.abstractmethod
    def _active(self) -> bool:
        """True while there is somewhere to write (False on other ranks, before and after the run)."""

    @abc.abstractmethod
    def _scalar(self, tag: str, value: float, step: int) -> None:
        """Write one value."""

    def _flush(self) -> None:
        """Make what was written durable (a checkpoint or an epoch end)."""

    def on_step_end(self, trainer: Trainer, step: TrainStep) -> None:
        if not self._active():
            return
        self._last_step = step.index
        self._lrs = [float(group["lr"]) for group in trainer.optimizer.param_groups]
        if step.index % self.every == 0:
            for task, loss in step.losses.items():
                if loss is not None:
                    self._scalar(f"loss/{task}", float(loss), step.index)
            for task, weight in step.weights.items():
                self._scalar(f"weight/{task}", float(weight), step.index)
        # the monitor checked this step before the trainer built `step`: its rows are there
        self._log_health(trainer)

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        if not self._active():
            return
        at = self._last_step if self._last_step is not None else max(int(trainer.step_index) - 1, 0)
        for row in rows:
            self._scalar(f"{row['split']}/{row['task']}/{row['metric']}", float(row["value"]), at)
        lrs = self._lrs if self._lrs is not None else [float(g["lr"]) for g in trainer.optimizer.param_groups]
        for i, lr in enumerate(lrs):
            self._scalar(f"lr/group{i}", lr, at)
        self._log_health(trainer)
        self._last_step, self._lrs = None, None
        self._flush()

    def _log_final(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """The remaining health rows and the final metrics (subclasses close after it)."""
        self._log_health(trainer)
        at = max(int(trainer.step_index) - 1, 0)
        for task, metrics in (summary.get("tasks") or {}).items():
            for metric, value in metrics.items():
                self._scalar(f"final/{task}/{metric}", float(value), at)
        if summary.get("delta_m") is not None:
            self._scalar("final/delta_m", float(summary["delta_m"]), at)
        self._flush()

    def _log_health(self, trainer: Trainer) -> None:
        for row in new_health_rows(trainer.health.rows, self._health_step):
            self._scalar(f"health/{row['kind']}/{row['name']}", float(row["value"]), int(row["step"]))
            self._health_step = max(self._health_step, int(row["step"]))
