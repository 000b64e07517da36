"""Records gradient conflict and TAG task affinity over training into RUN_DIR/diagnostics/."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from polytask.core.errors import InvalidParameterError
from polytask.diagnostics.affinity import AffinityStats, OptimizerLookahead, lookahead_affinity, model_losses
from polytask.diagnostics.conflict import ConflictStats
from polytask.train.callbacks.base import CALLBACKS, Callback, TrainStep

if TYPE_CHECKING:
    from polytask.train.trainer import Trainer

CONFLICT_FIELDS = ("step", "epoch", "kind", "name", "value")
AFFINITY_FIELDS = ("step", "epoch", "source", "target", "value")
FOLDER = "diagnostics"


@CALLBACKS.register("diagnostics")
class Diagnostics(Callback):
    """Gradient conflict from the engine's Gramians and TAG lookahead affinity every ``affinity_every`` steps.

    Conflict: every step whose engine report carries a Gramian (gradient methods at every step;
    loss methods on the health monitor's logging steps, ``health.every: N``) adds its task
    cosines and gradient norms (``polytask.diagnostics.conflict``), at no extra backward pass.

    Affinity: Z_{i→j} = 1 − L_j(θ′ᵢ)/L_j(θ) (Fifty et al., NeurIPS 2021; see
    ``polytask.diagnostics.affinity``) on the step's own batches, at the parameters and optimizer
    state the step started from (copied after the previous step), θ′ᵢ the run's optimizer
    applied to task i's gradient alone. Per affinity step: one forward with a graph, T
    shared-parameter gradients, T lookahead forwards; 0 turns it off. The time it takes is
    recorded (``affinity.seconds``).

    Files, rewritten at every epoch end (the CSV files once they have rows): ``diagnostics/conflict.csv`` (step, epoch, kind
    ``cosine``/``norm``, name, value), ``diagnostics/affinity.csv`` (step, epoch, source, target,
    value) and ``diagnostics/summary.json`` (per-epoch and overall mean cosine matrix, conflict
    fraction, norm ratios, mean affinity matrix). Only the main process measures and writes.
    A task scheduler with ``observe_affinity`` (``task_scheduler: affinity``) receives every
    measurement and learns ``affinity_every``; one with ``observe_validation`` (the bandit's
    ``reward: validation``) receives each epoch's validation losses.
    """

    key = "diagnostics"

    def __init__(self, affinity_every: int = 10, conflict: bool = True) -> None:
        if isinstance(affinity_every, bool) or not isinstance(affinity_every, int) or affinity_every < 0:
            raise InvalidParameterError(f"`affinity_every` of the diagnostics callback must be an int >= 0 (0: no affinity); "
                                        f"found {affinity_every!r}")
        if not isinstance(conflict, bool):
            raise InvalidParameterError(f"`conflict` of the diagnostics callback must be true or false; found {conflict!r}")
        self.every, self.conflict = affinity_every, conflict
        self.conflict_rows: list[dict[str, Any]] = []
        self.affinity_rows: list[dict[str, Any]] = []
        self.seconds = 0.0
        self.compare: str | None = None
        self._stats: tuple[ConflictStats, AffinityStats] | None = None
        self._saved: Mapping[str, Any] | None = None
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._snapshot_step = -1

    @property
    def reads_gramian(self) -> bool:  # type: ignore[override]
        return self.conflict  # the conflict statistics come from the report's Gramian

    def on_fit_start(self, trainer: Trainer) -> None:
        self.tasks = list(trainer.names)
        if hasattr(trainer.task_scheduler, "observe_validation"):  # the bandit's held-out reward comes from here
            trainer.task_scheduler.fed_by_diagnostics = True
        if hasattr(trainer.task_scheduler, "observe_affinity") and not self.every:
            raise InvalidParameterError("the affinity task scheduler needs affinity measurements: set affinity_every > 0 "
                                        "on the diagnostics callback (e.g. {name: diagnostics, affinity_every: 10})")
        self.conflict_stats, self.affinity_stats = ConflictStats(self.tasks), AffinityStats(self.tasks)
        if self._saved is not None:
            self.conflict_stats.load_state_dict(self._saved["conflict"])
            self.affinity_stats.load_state_dict(self._saved["affinity"])
        if self.every:
            names = {id(p): n for n, p in trainer.model.named_parameters()}
            self.shared = [names[id(p)] for p in trainer.model.shared_parameters() if p.requires_grad]
            wanted = set(self.shared)
            self.lookahead = OptimizerLookahead(trainer.optimizer,
                                                {n: p for n, p in trainer.model.named_parameters() if n in wanted})
            if trainer.step_index % self.every == 0:
                self._take_snapshot(trainer)
            if hasattr(trainer.task_scheduler, "observe_affinity"):  # the affinity scheduler trains every task here
                if not trainer.is_main or trainer.comm is not None:
                    raise InvalidParameterError("the affinity task scheduler is not supported in data-parallel training: "
                                                "only rank 0 measures affinity, so the ranks would choose different tasks")
                trainer.task_scheduler.every = self.every

    def _take_snapshot(self, trainer: Trainer) -> None:
        """θ and the optimizer state the next step starts from (the lookahead starts there)."""
        if not trainer.is_main:
            return
        self._snapshot = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        self.lookahead.snapshot()
        self._snapshot_step = trainer.step_index

    def on_step_end(self, trainer: Trainer, step: TrainStep) -> None:
        if not trainer.is_main:
            return
        report = step.report
        if self.conflict and report is not None and report.gramian is not None and len(report.tasks) > 1:
            tasks = [t for t in report.tasks if t in self.conflict_stats.index]
            if len(tasks) == len(report.tasks):
                self.compare = report.compare if report.compare in ("shared", "last_shared") else "shared"
                values = self.conflict_stats.add(step.epoch, tasks, report.gramian)
                for kind in ("cosine", "norm"):
                    self.conflict_rows += [{"step": step.index, "epoch": step.epoch, "kind": kind, "name": name,
                                            "value": value} for name, value in values[kind].items()]
        if not self.every:
            return
        if self._snapshot is not None and self._snapshot_step == step.index and step.batches:
            self._measure(trainer, step)
        if trainer.step_index % self.every == 0:
            self._take_snapshot(trainer)

    def _measure(self, trainer: Trainer, step: TrainStep) -> None:
        tasks = [t for t in self.tasks if step.losses.get(t) is not None]
        if not tasks:
            return
        started = time.perf_counter()
        model = trainer.model
        was_training = model.training
        model.train()
        try:
            losses_at = model_losses(model, step.batches, tasks, seed=trainer.seed + step.index)
            z = lookahead_affinity(losses_at, self._snapshot, self.shared, self.lookahead, tasks)  # type: ignore[arg-type]
        finally:
            model.train(was_training)
        self.affinity_stats.add(step.epoch, tasks, z)
        if hasattr(trainer.task_scheduler, "observe_affinity"):
            trainer.task_scheduler.observe_affinity(step.index, tasks, z.tolist())
        self.affinity_rows += [{"step": step.index, "epoch": step.epoch, "source": a, "target": b, "value": float(z[i, j])}
                               for i, a in enumerate(tasks) for j, b in enumerate(tasks) if math.isfinite(float(z[i, j]))]
        self.seconds += time.perf_counter() - started

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        scheduler = trainer.task_scheduler
        if hasattr(scheduler, "observe_validation"):  # every rank: the scheduler's draws must agree
            val = {r["task"]: r["value"] for r in rows if r["split"] == "val" and r["metric"] == "loss"}
            if not val and getattr(scheduler, "reward_source", None) == "validation":
                raise InvalidParameterError("the bandit's `reward: validation` needs validation data (data.val_fraction, "
                                            "or a val split); this run has none")
            scheduler.observe_validation(trainer.epoch, val)
        self._write(trainer)

    def summary(self) -> dict[str, Any]:
        return {"tasks": self.tasks,
                "conflict": {**self.conflict_stats.summary(), "compare": self.compare, "enabled": self.conflict},
                "affinity": {**self.affinity_stats.summary(), "every": self.every, "seconds": round(self.seconds, 3),
                             "rows": "source → target: 1 − L_target(θ after a step on source) / L_target(θ)"}}

    def _write(self, trainer: Trainer) -> None:
        run = trainer.writer
        if run is None:
            return
        run.write_json(f"{FOLDER}/summary.json", self.summary())
        if self.conflict_rows:
            run.write_csv(f"{FOLDER}/conflict.csv", CONFLICT_FIELDS, self.conflict_rows)
        if self.affinity_rows:
            run.write_csv(f"{FOLDER}/affinity.csv", AFFINITY_FIELDS, self.affinity_rows)

    def state_dict(self) -> dict[str, Any]:
        if not hasattr(self, "conflict_stats"):
            return dict(self._saved or {})
        return {"conflict": self.conflict_stats.state_dict(), "affinity": self.affinity_stats.state_dict(),
                "conflict_rows": list(self.conflict_rows), "affinity_rows": list(self.affinity_rows),
                "seconds": self.seconds, "compare": self.compare}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._saved = state
        self.conflict_rows, self.affinity_rows = list(state["conflict_rows"]), list(state["affinity_rows"])
        self.seconds, self.compare = float(state["seconds"]), state.get("compare")
