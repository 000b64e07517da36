"""The callbacks every run uses: CSV files, checkpoints, early stopping, plots, the console line."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

from polytask.train.callbacks.base import CALLBACKS, Callback, TrainStep
from polytask.train.checkpoint import save_checkpoint
from polytask.train.plots import plot_gradients, plot_training
from polytask.train.rundir import GRADIENT_FIELDS, METRIC_FIELDS, STEP_FIELDS

if TYPE_CHECKING:
    from polytask.train.trainer import Trainer


class CSVLogger(Callback):
    """metrics.csv (epoch, split, task, metric, value), steps.csv (step, epoch, task, loss,
    weight: one row per task that trained) and gradients.csv (the health monitor's rows),
    rewritten atomically at every epoch end."""

    def __init__(self) -> None:
        self.steps: list[dict[str, Any]] = []

    def on_step_end(self, trainer: Trainer, step: TrainStep) -> None:
        for task, weight in step.weights.items():
            loss = step.losses.get(task)
            if loss is not None:
                self.steps.append({"step": step.index, "epoch": step.epoch, "task": task, "loss": loss,
                                   "weight": weight})

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        run = trainer.writer
        if run is None:
            return
        run.write_csv("metrics.csv", METRIC_FIELDS, trainer.history)
        run.write_csv("steps.csv", STEP_FIELDS, self.steps)
        if trainer.health.rows:
            run.write_csv("gradients.csv", GRADIENT_FIELDS, trainer.health.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": list(self.steps)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = list(state["steps"])


class Checkpointing(Callback):
    """checkpoints/last.pt at every epoch end (and every ``every`` steps inside an epoch, so a
    killed run resumes mid-epoch exactly), the replaced one kept as previous.pt; best.pt when
    the monitored value improves. Runs last, so the state it saves includes every callback's. The
    first last.pt of a run that replaces another (``--overwrite``) settles the replacement
    (``RunDir.settle``: the old run's files, kept aside until then, are deleted)."""

    def __init__(self, every: int | None = None) -> None:
        self.every = every

    def on_step_end(self, trainer: Trainer, step: TrainStep) -> None:
        run = trainer.writer
        if (run is not None and self.every and trainer.epoch_step % self.every == 0
                and trainer.epoch_step < trainer.steps_this_epoch):
            save_checkpoint(run.last, trainer.state_dict(), previous=run.previous)
            run.settle()

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        run = trainer.writer
        if run is None:
            return
        if trainer.improved:
            save_checkpoint(run.best, {"model": trainer.model_state_dict(), "epoch": trainer.epoch})
        save_checkpoint(run.last, trainer.state_dict(), previous=run.previous)
        run.settle()  # the first checkpoint of a run that replaces another: the old one's files go


class EarlyStopping(Callback):
    """Stops training after ``patience`` epochs without improvement of the monitored value, and
    says so."""

    def __init__(self, patience: int) -> None:
        self.patience = patience

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        if trainer.bad_epochs >= self.patience and trainer.epoch < trainer.loop.epochs:
            trainer.stop = True
            trainer.say(f"early stopping after epoch {trainer.epoch}: {trainer.loop.monitor} has not improved for "
                        f"{self.patience} epoch(s); best epoch {trainer.best['epoch']}")


class Plots(Callback):
    """training.png and gradients.png, refreshed at most every ``interval`` seconds (drawing
    costs ~1 s) and at the end."""

    def __init__(self, interval: float = 30.0) -> None:
        self.interval = interval
        self._last = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        if trainer.writer is not None and time.perf_counter() - self._last > self.interval:
            self._draw(trainer)

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if trainer.writer is not None and trainer.history:
            self._draw(trainer)

    def _draw(self, trainer: Trainer) -> None:
        assert trainer.writer is not None
        plot_training(trainer.writer.path / "training.png", trainer.history, trainer.main_metrics)
        if trainer.health.rows:
            plot_gradients(trainer.writer.path / "gradients.png", trainer.health.rows)
        self._last = time.perf_counter()


@CALLBACKS.register("console")
class ConsoleLogger(Callback):
    """One line per epoch with the training loss and every task's main validation metric
    (Keras' ``fit`` habit), written above the progress bars."""

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        if not trainer.is_main:
            return
        values = {(r["split"], r["task"], r["metric"]): r["value"] for r in rows}
        parts = [f"epoch {trainer.epoch}/{trainer.loop.epochs}"]
        losses = [v for (split, _, metric), v in values.items() if split == "train" and metric == "loss"]
        if losses:
            parts.append(f"train loss {sum(losses) / len(losses):.4g}")
        for task in trainer.names:
            metric = trainer.main_metrics[task]
            value = values.get(("val", task, metric))
            if value is not None:
                parts.append(f"{task} {metric} {value:.4g}")
        if trainer.improved:
            parts.append("(best)")
        tqdm.write("  ".join(parts))
