"""The training loop: forward, per-task losses, the engine's update, optimiser step; callbacks do the rest."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from polytask.core.errors import DataError, InvalidParameterError, closest
from polytask.core.options import options
from polytask.core.registry import Registry
from polytask.core.task import Task, task_names
from polytask.data.dataset import Batch, MultiOutputDataset, TaskDatasets
from polytask.data.loader import epoch_batches, steps_in_epoch
from polytask.data.samplers import SAMPLERS, Sampler
from polytask.data.torch_data import TorchData, as_data
from polytask.engine.backward import Engine
from polytask.engine.comm import Communicator
from polytask.engine.options import EngineOptions
from polytask.engine.sharded import ShardedEngine
from polytask.methods.base import METHODS, Method
from polytask.metrics.delta_m import delta_m
from polytask.metrics.registry import METRICS
from polytask.metrics.tracker import TaskMetrics
from polytask.models.base import MultiTaskModel
from polytask.scheduling import TASK_SCHEDULERS, TaskScheduler
from polytask.train import fsdp, optim_step
from polytask.train.callbacks import Callback, Checkpointing, ConsoleLogger, CSVLogger, EarlyStopping, Plots
from polytask.train.callbacks.base import TrainStep, build_callback
from polytask.train.checkpoint import CheckpointError, load_checkpoint, load_latest
from polytask.train.health import GradientMonitor, HealthOptions
from polytask.train.optim import build_optimizer, build_scheduler, parameter_groups
from polytask.train.optim_step import clear_grads
from polytask.train.options import LoopOptions, OptimOptions, RunOptions
from polytask.train.rundir import RunDir

#: what fit/evaluate take: in-memory data, a torch Dataset/DataLoader (as TorchData, wrapped on the way in), or per-task
#: data sets (TaskDatasets, or a mapping task → any of these)
Data = MultiOutputDataset | TaskDatasets | TorchData
C = TypeVar("C", bound=Callback)
Spec = str | Mapping[str, Any]

#: keyword arguments of the flat Trainer of wave 1 → where they live now
_REMOVED = {**{k: f"loop={{'{k}': ...}}" for k in ("epochs", "batch_size", "steps_per_epoch", "loader_mode", "monitor",
                                                     "patience", "checkpoint_every")},
            **{k: f"optim={{'{k}': ...}}" for k in ("optimizer", "lr", "weight_decay", "momentum", "scheduler", "clip")},
            **{k: f"run={{'{k}': ...}}" for k in ("device", "precision", "progress")},
            "method_params": "method={'name': NAME, **params}", "sampler_params": "sampler={'name': NAME, **params}",
            "task_scheduler_params": "task_scheduler={'name': NAME, **params}"}


@dataclass
class Report:
    """What ``fit`` returns: per-epoch rows, the best epoch and the final per-task metrics."""

    metrics: dict[str, dict[str, float]]
    best_epoch: int
    history: list[dict[str, Any]]
    summary: dict[str, Any] = field(default_factory=dict)


class Trainer:
    """Trains a :class:`MultiTaskModel` on named tasks with any registered method.

    Args:
        model: the architecture. tasks: its tasks (order sets the order of logs).
        method, sampler, task_scheduler: a registry name, ``{"name": NAME, **params}`` or an
            object. The sampler picks the data set of each step when tasks have their own; the
            task scheduler picks which tasks with data in a step train.
        loop, optim, engine, health, run: the option sections :class:`LoopOptions`,
            :class:`OptimOptions`, :class:`EngineOptions`, :class:`HealthOptions`,
            :class:`RunOptions` (an instance or a mapping of its fields; the YAML sections
            ``train``, ``optim``, ``engine``, ``health``, ``run``).
        callbacks: extra :class:`Callback` s, or ``{"name": NAME, **params}`` with NAME registered in
            ``CALLBACKS`` or a class by import path (``package.module:ClassName``),
            called after the built-in ones (CSV, plots, console, early stopping) and before the
            checkpoint, so their state is saved with it.
        baselines: single-task metrics {task: {metric: value}} for Δm.
        output_dir: run directory (None: nothing written). resume / overwrite: see RunDir.
        seed: seeds the data order, the sampler, the scheduler and the engine's random stream.
        config_text: the resolved YAML written to config.yaml.
        objectives: extra loss terms (distillation, ``polytask.distill``): objects with ``terms``, a
            mapping term name → its task, called in every training forward as ``objective(trainer,
            batch, outputs, z, losses)`` → ``{term: scalar or None}`` (a term named like a task
            replaces that task's loss). The method is set up with the task names, then the term names
            (a term takes its task's data size and weight), so it balances them like tasks. An
            ``nn.Module`` objective is moved to the device, its ``parameter_groups(lr,
            weight_decay)`` are optimised and its state is checkpointed.
    """

    def __init__(self, model: MultiTaskModel, tasks: Sequence[Task], *, method: Spec | Method = "static",
                 sampler: Spec | Sampler = "proportional", task_scheduler: Spec | TaskScheduler = "all",
                 loop: LoopOptions | Mapping[str, Any] | None = None, optim: OptimOptions | Mapping[str, Any] | None = None,
                 engine: EngineOptions | Mapping[str, Any] | None = None,
                 health: HealthOptions | Mapping[str, Any] | None = None, run: RunOptions | Mapping[str, Any] | None = None,
                 callbacks: Sequence[Callback | Mapping[str, Any]] = (), baselines: Mapping[str, Mapping[str, float]] | None = None,
                 output_dir: str | Path | None = None, seed: int = 0, resume: bool = False, overwrite: bool = False,
                 config_text: str | None = None, objectives: Sequence[Any] = (), **removed: Any) -> None:
        for key in removed:
            hint = f" use {_REMOVED[key]}" if key in _REMOVED else closest(key, list(_REMOVED))
            raise InvalidParameterError(f"Trainer has no argument `{key}`;{hint}")
        if isinstance(tasks, (str, bytes)) or not all(isinstance(t, Task) for t in tasks):
            raise InvalidParameterError("`tasks` must be a sequence of polytask.Task objects (e.g. data.tasks); found "
                                        f"{[type(t).__name__ for t in tasks] if not isinstance(tasks, str) else 'a string'}")
        self.tasks = list(tasks)
        self.names = task_names(self.tasks)
        self.objectives = list(objectives)
        self.term_tasks = {term: task for o in self.objectives for term, task in o.terms.items()}
        self.loss_names = self.names + tuple(self.term_tasks)
        wrong = {term: task for term, task in self.term_tasks.items() if task not in self.names or term in self.names}
        every_term = [term for o in self.objectives for term in o.terms]
        if wrong or len(set(every_term)) != len(every_term):
            raise InvalidParameterError(f"objective terms {wrong or list(self.term_tasks)} must each belong to one of the tasks "
                                        f"{list(self.names)}, with a name of their own (no task's, no other term's)")
        if not isinstance(model, MultiTaskModel):
            raise InvalidParameterError(f"model must be a polytask MultiTaskModel; found {type(model).__name__}")
        if set(model.task_names) != set(self.names):
            raise InvalidParameterError(f"model tasks {list(model.task_names)} differ from trainer tasks {list(self.names)}")
        self.loop = options(LoopOptions, loop, "loop")
        self.optim = options(OptimOptions, optim, "optim")
        self.health_options = options(HealthOptions, health, "health")
        self.run_options = options(RunOptions, run, "run")
        engine_options = options(EngineOptions, engine, "engine")
        self.seed, self.baselines = seed, {t: dict(v) for t, v in (baselines or {}).items()}
        self.device = resolve_device(self.run_options.device)
        self.comm = Communicator.from_env(self.device)
        self.is_main = self.comm is None or self.comm.is_main
        self.model = model.to(self.device)
        # distillation objectives may own parameters (feature adaptors): trained like the model's
        objective_modules = [o.to(self.device) for o in self.objectives if isinstance(o, torch.nn.Module)]
        if self.comm is not None:  # every rank starts from rank 0's parameters
            for module in (self.model, *objective_modules):
                for tensor in module.state_dict().values():
                    torch.distributed.broadcast(tensor, src=0)
        # run.distributed: fsdp shards every parameter-owning module (in one process there is nothing to shard)
        self.sharded = self.comm is not None and self.run_options.distributed == "fsdp"
        if self.sharded:
            fsdp.shard_model(self.model)
        self._gathered: tuple[dict[str, Tensor], dict[str, Any] | None] | None = None  # full state under FSDP
        self._rank_metrics: list[Any] | None = None  # every rank's partial epoch metrics, for a mid-epoch checkpoint
        self.method: Method = _build(METHODS, method, Method, "method")
        self.method.to(self.device)
        self.method_name = getattr(type(self.method), "registry_name", type(self.method).__name__)
        self.sampler: Sampler = _build(SAMPLERS, sampler, Sampler, "sampler")
        self.task_scheduler: TaskScheduler = _build(TASK_SCHEDULERS, task_scheduler, TaskScheduler, "task_scheduler")
        engine_class, sharded = (ShardedEngine, {"sharded_params": model.parameters()}) if self.sharded else (Engine, {})
        trainable = [*model.parameters(), *self.method.parameters(), *(p for o in objective_modules for p in o.parameters())]
        self.engine = engine_class(self.method, model.shared_parameters(), last_shared_params=model.last_shared_parameters(),
                                   **engine_options.model_dump(), seed=seed, task_clip=self.optim.clip.per_task,
                                   comm=self.comm, reduce_params=trainable, params=trainable, **sharded)
        if self.engine.compare == "features" and not model.shares_representation:
            raise InvalidParameterError(
                f"'{self.method_name}' would compare gradients on the features, but architecture "
                f"{type(model).__name__} gives each task its own slice of the representation, so the task gradients "
                "there never meet (no conflict to see); use engine.compare: shared or last_shared")
        self.health = GradientMonitor(model, self.health_options)
        self.higher_is_better = self._check_monitor(self.loop.monitor)
        precision = self.run_options.precision
        if precision == "16" and self.device.type != "cuda":
            raise InvalidParameterError("`precision` 16 (fp16 with a gradient scaler) needs a CUDA device; use bf16 on CPU")
        self.autocast_dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16" else None
        self._unit = torch.ones((), device=self.device)  # what `_loss_scale` passes through the scaler
        groups = parameter_groups(model, self.tasks, self.method.parameters(), lr=self.optim.lr,
                                  weight_decay=self.optim.weight_decay)
        for objective in objective_modules:
            groups += objective.parameter_groups(self.optim.lr, self.optim.weight_decay)
        self.optimizer = build_optimizer(self.optim.optimizer, groups, lr=self.optim.lr, momentum=self.optim.momentum,
                                         fused=self.optim.fused)
        self.scheduler = build_scheduler(self.optim.scheduler, self.optimizer, epochs=self.loop.epochs)
        self.data_generator = torch.Generator().manual_seed(seed + 1)
        self.sampler_generator = torch.Generator().manual_seed(seed + 2)
        self.schedule_generator = torch.Generator().manual_seed(seed + 4)
        self.run_dir = Path(output_dir) if output_dir is not None else None
        self.writer = RunDir(output_dir) if output_dir is not None and self.is_main else None  # only rank 0 writes
        self.resume, self.overwrite, self.config_text = resume, overwrite, config_text
        self.main_metrics = {t.name: t.main_metric for t in self.tasks}
        self.metrics = TaskMetrics(self.tasks, self.device)  # validates metric names early
        self.callbacks = self._callbacks(callbacks)
        self._gramian_read = self._callbacks_read_gramian()
        self.history: list[dict[str, Any]] = []
        self.epoch = self.step_index = self.epoch_step = self.steps_this_epoch = 0
        self.epoch_rng: dict[str, Tensor] = {}
        self.weight_sums: dict[str, float] = {}
        self.weight_counts: dict[str, int] = {}
        self.best: dict[str, Any] = {"epoch": -1, "score": None}
        self.bad_epochs, self.improved, self.stop = 0, False, False
        self.train_seconds = 0.0  # of the earlier segments of a resumed run
        self._fit_started: float | None = None
        self._best_state: dict[str, Tensor] | None = None

    def _callbacks(self, extra: Sequence[Callback | Mapping[str, Any]]) -> list[Callback]:
        users = [build_callback(cb) for cb in extra]
        built: list[Callback] = [CSVLogger(), Plots()]
        if self.run_options.progress and not any(isinstance(cb, ConsoleLogger) for cb in users):
            built.append(ConsoleLogger())  # on by default with progress; naming `console` as well is no duplicate
        if self.loop.patience is not None:
            built.append(EarlyStopping(self.loop.patience))
        built += users
        built.append(Checkpointing(self.loop.checkpoint_every))
        keys = [cb.state_key for cb in built]
        doubled = sorted({k for k in keys if keys.count(k) > 1})
        if doubled:
            raise InvalidParameterError(f"callbacks {doubled} appear twice; give each a distinct `key` attribute "
                                        "(their states are saved under it)")
        return built

    def callback(self, kind: type[C]) -> C:
        """The trainer's callback of this class (e.g. ``trainer.callback(CSVLogger).steps``)."""
        for callback in self.callbacks:
            if isinstance(callback, kind):
                return callback
        raise InvalidParameterError(f"this trainer has no {kind.__name__} callback")

    def say(self, message: str) -> None:
        """A line on the console (rank 0, when progress is on), above the progress bars."""
        if self.is_main and self.run_options.progress:
            tqdm.write(message)

    # ------------------------------------------------------------------------------- public API
    def check(self, train: Data, val: Data | None = None, test: Data | None = None) -> None:
        """Validate the data and set up method, sampler and scheduler; writes nothing.

        Everything that can reject the input happens here, before a run directory is touched.
        Besides polytask data, ``train``/``val``/``test`` may be a ``torch.utils.data`` Dataset or
        DataLoader, or a mapping task → data (see :mod:`polytask.data.torch_data`).
        """
        train, val, test = (as_data(d, f"{s} data") for s, d in (("train", train), ("val", val), ("test", test)))
        for split, data in (("train", train), ("val", val), ("test", test)):
            if data is not None:
                self._check_data(data, split)
        if self.loop.monitor != "loss" and val is None:
            raise InvalidParameterError(f"monitor '{self.loop.monitor}' needs validation data")
        if isinstance(train, TaskDatasets):
            sizes = train.sizes
        else:  # one data set for all tasks: the same size for each (a stream's is unknown, and equal is all that counts)
            rows = len(train) if not isinstance(train, TorchData) or train.has_length() else 1
            sizes = {t: rows for t in self.names}
        weights = {t.name: t.weight for t in self.tasks}
        self.method.setup(self.loss_names, sizes={**sizes, **{k: sizes[t] for k, t in self.term_tasks.items()}},
                          static_weights={**weights, **{k: weights[t] for k, t in self.term_tasks.items()}})
        if isinstance(train, TaskDatasets):
            self.sampler.setup({t: sizes[t] for t in self.names})
        self.task_scheduler.setup(self.names)

    def fit(self, train: Data, val: Data | None = None, test: Data | None = None) -> Report:
        """Train for ``loop.epochs`` (or until a callback stops it) and return the report."""
        train, val, test = (as_data(d, f"{s} data") for s, d in (("train", train), ("val", val), ("test", test)))
        self.check(train, val, test)
        try:
            self._open_run()
            self._fit_started = started = time.perf_counter()
            self._gramian_read = self._callbacks_read_gramian()  # the list may have changed since __init__
            for callback in self.callbacks:
                callback.on_fit_start(self)
            while self.epoch < self.loop.epochs and not self.stop:
                rows = self._train_epoch(train)
                if val is not None:
                    rows += self._rows("val", self._evaluate(val))
                self.history.extend(rows)
                self._end_epoch(rows, time.perf_counter() - started)
            summary = self._finish(train, val, test, time.perf_counter() - started)
        except BaseException:
            if self.writer is not None:  # a run this one replaces comes back while this one has no checkpoint
                self.writer.rollback()
            raise
        finally:
            self.engine.release_memory()  # J's storage, kept between steps for speed: not needed once fit ends
            if self._fit_started is not None:
                self.train_seconds += time.perf_counter() - self._fit_started
                self._fit_started = None
        return Report(metrics=summary["tasks"], best_epoch=summary["best_epoch"], history=self.history, summary=summary)

    @torch.no_grad()
    def evaluate(self, data: Data) -> dict[str, dict[str, float]]:
        """Per-task metrics and mean loss on ``data`` (each task on its own set if per-task).

        ``data`` is validated as ``fit`` validates its splits (targets' shapes, ranges, NaN; a
        ``TorchData`` already validated for these tasks is checked batch by batch as it is read,
        and its first item is not read again). It may be called at any time, from a callback in
        the middle of an epoch too: it accumulates into a tracker of its own (the training epoch's
        metrics and losses are left as they were) and gives every module of the model back the
        training mode it had.
        """
        data = as_data(data, "evaluation data")

        def validated(ds: Any, tasks: Sequence[Task]) -> bool:  # a TorchData whose batches are checked for `tasks`
            return (isinstance(ds, TorchData) and ds.tasks is not None and len(ds.tasks) == len(tasks)
                    and all(a is b for a, b in zip(ds.tasks, tasks)))
        by_name = {t.name: t for t in self.tasks}
        parts = ([(ds, [by_name.get(t)]) for t, ds in data.datasets.items()] if isinstance(data, TaskDatasets)
                 else [(data, self.tasks)])
        if not all(validated(ds, tasks) for ds, tasks in parts):
            self._check_data(data, "evaluation")
        return self._evaluate(data)

    @torch.no_grad()
    def _evaluate(self, data: Data) -> dict[str, dict[str, float]]:
        """:meth:`evaluate` of data already validated (``fit``'s splits, checked once at its start)."""
        tracker = getattr(self, "_eval_metrics", None)
        if tracker is None:  # built at the first evaluation: not the training epoch's self.metrics
            tracker = self._eval_metrics = TaskMetrics(self.tasks, self.device)
        tracker.reset()
        modes = [(module, module.training) for module in self.model.modules()]
        self.model.eval()
        try:
            for batch in self._eval_batches(data):
                batch = batch.to(self.device)
                active = self._active(batch)
                outputs = self.model(batch.x, tasks=active, task=batch.source)
                losses = {t: self._task(t).loss(outputs[t], batch.targets[t], batch.masks.get(t)) for t in active}
                tracker.update(outputs, batch.targets, batch.masks, losses)
            return tracker.compute()
        finally:
            for module, training in modes:
                module.training = training

    @torch.no_grad()
    def predict(self, x: Tensor, *, task: str | None = None, batch_size: int = 1024) -> dict[str, Tensor]:
        """Predictions per task: values (regression), probabilities (binary, multilabel) or classes."""
        self.model.eval()
        chunks: dict[str, list[Tensor]] = {t: [] for t in self.names}
        for start in range(0, len(x), batch_size):
            out = self.model(x[start:start + batch_size].to(self.device), task=task)
            for name, value in out.items():
                chunks[name].append(self._task(name).predict(value).cpu())
        return {t: torch.cat(v) for t, v in chunks.items() if v}

    # ------------------------------------------------------------------------------ the loop
    def _train_epoch(self, train: Data) -> list[dict[str, Any]]:
        self.model.train()
        self.steps_this_epoch = total = steps_in_epoch(train, self.loop.batch_size, self.loop.loader_mode,
                                                       self.loop.steps_per_epoch)
        if self.epoch_step == 0:
            self.metrics.reset()
            self.weight_sums, self.weight_counts = {t: 0.0 for t in self.loss_names}, {t: 0 for t in self.loss_names}
            self.epoch_rng = {"data": self.data_generator.get_state(), "sampler": self.sampler_generator.get_state()}
        else:  # resuming mid-epoch: replay the epoch's draws up to where the checkpoint was taken
            self.data_generator.set_state(self.epoch_rng["data"])
            self.sampler_generator.set_state(self.epoch_rng["sampler"])
        batches = epoch_batches(train, self.loop.batch_size, generator=self.data_generator, sampler=self.sampler,
                                sampler_generator=self.sampler_generator, step=self.step_index - self.epoch_step,
                                total_steps=total * self.loop.epochs, mode=self.loop.loader_mode,
                                steps_per_epoch=self.loop.steps_per_epoch)
        for _ in range(self.epoch_step):
            next(batches)
        bar = tqdm(batches, total=total, initial=self.epoch_step, desc=f"epoch {self.epoch + 1}/{self.loop.epochs}",
                   leave=False, disable=not self.run_options.progress or not self.is_main, dynamic_ncols=True)
        for groups in bar:
            step = self._train_step([b.to(self.device) for b in groups])
            for t, w in step.weights.items():
                if step.losses.get(t) is not None:
                    self.weight_sums[t] += w
                    self.weight_counts[t] += 1
            self.step_index += 1
            self.epoch_step += 1
            every = self.loop.checkpoint_every
            if self.sharded and every and self.epoch_step % every == 0:
                self._gathered = fsdp.full_state(self.model, self.optimizer)  # collective: rank 0 may checkpoint now
            if self.comm is not None and every and self.epoch_step % every == 0:
                # collective: every rank's share of the epoch's metrics so far goes into rank 0's checkpoint
                ranks: list[Any] = [None] * self.comm.world_size
                torch.distributed.all_gather_object(ranks, self.metrics.state_dict())
                self._rank_metrics = ranks
            for callback in self.callbacks:
                callback.on_step_end(self, step)
            self._gathered = self._rank_metrics = None
        bar.close()
        self.epoch_step = 0
        computed = self.metrics.compute()
        for t in self.names:
            if self.weight_counts[t]:
                computed[t]["weight"] = self.weight_sums[t] / self.weight_counts[t]
        return self._rows("train", computed)

    def _train_step(self, groups: list[Batch]) -> TrainStep:
        """One update from a step's batches (one per data set drawn); only scheduled tasks train."""
        available = [t for t in self.names if any(t in b.targets for b in groups)]
        active = self.task_scheduler.select(self.step_index, available, self.schedule_generator)
        losses, counts, features = self._forward_parts(groups, active)
        if self.comm is not None:
            losses = self._rank_weighted(losses, counts)
        present = [t for t, v in losses.items() if v is not None]
        # .mean(): a method with batch_parts > 1 gets each task's part losses; the step's loss is their mean
        parts = self.engine.batch_parts > 1
        if not parts and self.comm is None and self.device.type == "cpu":  # a stack, detach and tolist cost more
            numbers = [losses[t].item() for t in present]  # type: ignore[union-attr]
        else:  # one transfer from an accelerator, and the ranks' mean
            values = (torch.stack([losses[t].mean() if parts else losses[t] for t in present]).detach()  # type: ignore[union-attr]
                      if present else torch.zeros(0))
            if self.comm is not None and present:
                values = self.comm.mean_(values.clone())
            numbers = values.tolist()
        loss_values = {t: None for t in losses} | dict(zip(present, numbers, strict=True))
        bad = [t for t, v in loss_values.items() if v is not None and not math.isfinite(v)]
        if bad and self.health.non_finite_losses(self.step_index, bad):
            return TrainStep(self.step_index, self.epoch, loss_values, {t: 0.0 for t in losses}, None, False)
        # with policy "skip", a dropped step must leave the method exactly as it was; so must an fp16 step the
        # scaler skips (its gradients overflowed): FAMO's logits would learn from two losses of one model
        snapshot = (copy.deepcopy(self.engine.state_dict())
                    if self.health_options.policy == "skip" or self.scaler is not None else None)
        self._zero_grads()
        report = self.engine.backward(losses, features=features, epoch=self.epoch, extra_loss=self.model.extra_loss(),
                                      scale=self._loss_scale(),
                                      diagnose=self.health.wants_gramian(self.step_index),
                                      report_gramian=self._gramian_read,
                                      lookahead=self._rank_weighted_outer(groups, active) if self.engine.lookahead else None)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # before clipping, so thresholds are in true units
        # overflowing fp16 steps are the scaler's to skip; look only at finite ones
        overflow = self.scaler is not None and not all(
            torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None)
        if overflow and snapshot is not None:
            self.engine.load_state_dict(snapshot)
        if not overflow and self.health.check(self.step_index, report.tasks, report.gramian, report.task_norms):
            self._zero_grads()
            if snapshot is not None:
                self.engine.load_state_dict(snapshot)
            return TrainStep(self.step_index, self.epoch, loss_values, {t: 0.0 for t in losses}, report, False)
        self._optimizer_step()
        self.task_scheduler.observe(self.step_index, {t: v for t, v in loss_values.items() if v is not None})
        return TrainStep(self.step_index, self.epoch, loss_values, report.weights, report, True, tuple(groups))

    def _zero_grads(self) -> None:
        clear_grads(self.optimizer)

    def _callbacks_read_gramian(self) -> bool:
        """Whether a callback reads the report's Gramian every step (the engine then forms G wherever
        it forms J: a Jacobian method's G is otherwise formed only when the method reads it); asked
        when the callbacks are set and when fit starts, not at every step."""
        return any(getattr(callback, "reads_gramian", False) for callback in self.callbacks)

    def _forward_parts(self, groups: list[Batch], active: Sequence[str]
                       ) -> tuple[dict[str, Tensor | None], dict[str, int], list[Tensor]]:
        """``_forward``, or, for a method that asks for k > 1 independent parts of each batch
        (``Method.batch_parts``, e.g. MoDo), ``_forward`` on each part with the k losses stacked."""
        k = self.engine.batch_parts
        if self.engine.lookahead:  # bilevel: the first half is the step's (inner) batch, the second the outer
            return self._forward([b.shard(0, 2) for b in groups], active)
        if k == 1:
            return self._forward(groups, active)
        runs = [self._forward([b.shard(a, k) for b in groups], active) for a in range(k)]
        losses: dict[str, Tensor | None] = {}
        for t in runs[0][0]:
            values = [run[0].get(t) for run in runs]
            losses[t] = None if any(v is None for v in values) else torch.stack(values)  # type: ignore[arg-type]
        # per part: each rank's part loss is rescaled by its share of that part's labels
        counts = {t: tuple(run[1].get(t, 0) for run in runs) for t in runs[0][1]}
        return losses, counts, [z for run in runs for z in run[2]]

    def _rank_weighted_outer(self, groups: list[Batch], active: Sequence[str]):
        """``_outer_losses``, with each rank's outer (or inner) half-batch losses rescaled as
        ``_rank_weighted`` does the step's, so that their mean over ranks is the global half's."""
        closure = self._outer_losses(groups, active)
        if self.comm is None:
            return closure
        factors = {half: self._rank_factors(self._label_counts([b.shard(i, 2) for b in groups], active))
                   for i, half in enumerate(("inner", "outer"))}

        def losses(replace: Mapping[int, Tensor], batch: str = "outer") -> dict[str, Tensor | None]:
            out = closure(replace) if batch == "outer" else closure(replace, batch=batch)
            # a rank without labels for a task others have gives a zero that still reaches θ
            zero = sum(value.sum() * 0.0 for value in replace.values())
            return {t: None if f is None else (zero if out.get(t) is None else out[t] * f)  # type: ignore[operator]
                    for t, f in factors.get(batch, factors["outer"]).items()}
        return losses

    def _label_counts(self, groups: list[Batch], active: Sequence[str]) -> dict[str, int]:
        """This rank's labelled rows per task, where ``_forward`` would take each task's loss."""
        assert self.comm is not None
        counts: dict[str, int] = {}
        for batch in groups:
            batch = batch.shard(self.comm.rank, self.comm.world_size)
            for t in active:
                if t in batch.targets and t not in counts:
                    mask = batch.masks.get(t)
                    counts[t] = len(batch) if mask is None else int(mask.sum())
        return counts

    def _outer_losses(self, groups: list[Batch], active: Sequence[str]):
        """The closure over the outer half of each batch that a bilevel method evaluates at displaced
        shared parameters ({id(parameter): replacement}, through ``torch.func.functional_call``);
        ``batch="inner"`` evaluates the first half, the step's own, instead (FORUM's inner steps)."""
        halves = {"inner": [b.shard(0, 2) for b in groups], "outer": [b.shard(1, 2) for b in groups]}
        names = {id(p): n for n, p in self.model.named_parameters()}

        def losses(replace: Mapping[int, Tensor], batch: str = "outer") -> dict[str, Tensor | None]:
            params = {names[i]: value for i, value in replace.items()}
            out: dict[str, Tensor | None] = {}
            for half in halves[batch]:
                if self.comm is not None:
                    half = half.shard(self.comm.rank, self.comm.world_size)
                tasks = [t for t in active if t in half.targets and t not in out]
                if tasks:
                    preds = torch.func.functional_call(self.model, params, (half.x,), {"tasks": tasks, "task": half.source})
                    out.update({t: self._task(t).loss(preds[t], half.targets[t], half.masks.get(t)) for t in tasks})
            return out
        return losses

    def _forward(self, groups: list[Batch], active: Sequence[str]
                 ) -> tuple[dict[str, Tensor | None], dict[str, int], list[Tensor]]:
        """Each task's loss on its batch, the labelled counts (under torch.distributed only, where
        ``_rank_weighted`` uses them; empty in one process) and the shared representations."""
        distributed = self.comm is not None
        losses: dict[str, Tensor | None] = {}
        counts: dict[str, int] = {}
        features: list[Tensor] = []
        for batch in groups:
            tasks = [t for t in active if t in batch.targets and t not in losses]
            if not tasks:
                continue
            if self.comm is not None:
                batch = batch.shard(self.comm.rank, self.comm.world_size)
            with (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype is not None
                  else contextlib.nullcontext()):
                z = self.model.encode(batch.x, batch.source)
                outputs = self.model.decode(z, tasks)
                for t in tasks:
                    mask = batch.masks.get(t)
                    losses[t] = self._task(t).loss(outputs[t], batch.targets[t], mask)
                    if distributed:  # the counts rescale each rank's loss; one process needs none (and no sync)
                        counts[t] = len(batch) if mask is None else int(mask.sum())
                        # no labelled row here (a last batch smaller than the world has none on some rank:
                        # its mean loss is NaN, which a factor of 0 keeps NaN): a zero that keeps this
                        # rank's graph like the others'
                        if losses[t] is None or counts[t] == 0:
                            losses[t] = outputs[t].sum() * 0.0
            features.append(z)
            self.metrics.update(outputs, batch.targets, batch.masks, {t: losses[t] for t in tasks})
            for objective in self.objectives:  # after the metrics: they report the tasks' own losses
                terms = objective(self, batch, outputs, z, {t: losses[t] for t in tasks})
                losses.update(terms)
                if distributed:
                    counts.update({k: len(batch) for k in terms if k not in self.names})
        return losses, counts, features

    def _loss_scale(self) -> float:
        """The fp16 loss scale the engine multiplies the losses by (1 without a scaler). The engine,
        not the scaler, scales the losses, so the scale is read through ``scaler.scale``: the scaler
        makes its scale tensor on its first ``scale`` call, and ``unscale_`` fails without it
        (``get_scale`` alone left it unmade: every fp16 step failed, found on a GPU)."""
        if self.scaler is None:
            return 1.0
        return float(self.scaler.scale(self._unit))

    def _optimizer_step(self) -> None:
        clip = self.optim.clip
        if clip.value is not None:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), clip.value)
        if clip.norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip.norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            optim_step.step(self.optimizer)  # optimizer.step(), with less of torch's Python where exact

    def _rank_weighted(self, losses: dict[str, Tensor | None], counts: dict[str, int | tuple[int, ...]]
                       ) -> dict[str, Tensor | None]:
        """Scale each rank's per-task mean loss so that the mean over ranks is the global batch
        mean (shards and labelled counts may differ); tasks no rank has labels for drop out. With
        batch parts (a loss of shape (k,), counts per part) each part is scaled by its own counts."""
        factors = self._rank_factors(counts)
        out: dict[str, Tensor | None] = {}
        for t, loss in losses.items():
            f = factors.get(t)
            out[t] = None if loss is None or f is None else loss * f.to(loss)
        return out

    def _rank_factors(self, counts: Mapping[str, int | tuple[int, ...]]) -> dict[str, Tensor | None]:
        """Per task: this rank's labelled count × W / the global count (one factor per batch part),
        or None where some part has no labels on any rank (the task drops out, as in one process)."""
        assert self.comm is not None
        names = list(counts)
        parts = [torch.tensor(counts[t], dtype=torch.float64).reshape(-1) for t in names]
        local = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        total = self.comm.sum_(local.clone())
        out: dict[str, Tensor | None] = {}
        offset = 0
        for t, part in zip(names, parts, strict=True):
            n, k = total[offset:offset + len(part)], len(part)
            out[t] = None if bool((n == 0).any()) else (local[offset:offset + k] * self.comm.world_size / n).squeeze(0)
            offset += k
        return out

    def _end_epoch(self, rows: list[dict[str, Any]], seconds: float) -> None:
        train_losses = {r["task"]: r["value"] for r in rows if r["split"] == "train" and r["metric"] == "loss"}
        val_metrics: dict[str, dict[str, float]] = {}
        for r in rows:
            if r["split"] == "val":
                val_metrics.setdefault(r["task"], {})[r["metric"]] = r["value"]
        self.method.on_epoch_end(self.epoch, train_losses, val_metrics or None)
        if self.scheduler is not None:
            self.scheduler.step()
        score = self._score(rows)
        self.improved = self.best["score"] is None or (score > self.best["score"] if self.higher_is_better
                                                       else score < self.best["score"])
        self.epoch += 1
        if self.improved:
            self.best = {"epoch": self.epoch, "score": score}
            self.bad_epochs = 0
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_epochs += 1
        if self.sharded:  # collective: rank 0's checkpoint saves the gathered state
            self._gathered = fsdp.full_state(self.model, self.optimizer)
        for callback in self.callbacks:
            callback.on_epoch_end(self, rows)
        self._gathered = None

    def _finish(self, train: Data, val: Data | None, test: Data | None, seconds: float) -> dict[str, Any]:
        if self._best_state is not None:
            self._load_model(self._best_state)
        split, data = ("test", test) if test is not None else ("val", val) if val is not None else ("train", train)
        final = self._evaluate(data)
        summary: dict[str, Any] = {
            "tasks": final, "split": split, "best_epoch": self.best["epoch"], "epochs_run": self.epoch,
            "monitor": self.loop.monitor, "method": self.method_name, "main_metrics": self.main_metrics,
            "train_seconds": round(self.train_seconds + seconds, 2), "health_events": self.health.events,
        }
        if self.baselines:
            summary["baselines"] = self.baselines
            zero = [t for t, m in self.main_metrics.items() if self.baselines.get(t, {}).get(m) == 0]
            if zero:  # a stated result, not a failed run: the relative change to a zero baseline is undefined
                why = (f"Δm is undefined: the single-task {', '.join(repr(self.main_metrics[t]) for t in zero)} of "
                       f"task(s) {zero} is 0, and Δm divides by it")
                warnings.warn(why, stacklevel=2)
                summary["delta_m"], summary["delta_m_undefined"] = math.nan, why
            else:
                summary["delta_m"] = delta_m(final, self.baselines, self.main_metrics)
        if self.writer is not None:
            self.writer.write_json("summary.json", summary)
        for callback in self.callbacks:
            callback.on_fit_end(self, summary)
        return summary

    def _open_run(self) -> None:
        """Prepare the run directory, load a resumed run's state, write config.yaml."""
        if self.writer is not None:
            self.writer.prepare(resume=self.resume, overwrite=self.overwrite)
        if self.comm is not None:
            torch.distributed.barrier()  # the run directory exists (and was checked) before any rank reads it
        if self.run_dir is not None and self.resume:  # before config.yaml is rewritten: a mismatch leaves the run intact
            run = RunDir(self.run_dir)
            self.load_state_dict(load_latest(run.last, run.previous))
            if run.best.exists():
                self._best_state = load_checkpoint(run.best)["model"]  # full tensors: _load_model shards them under FSDP
        if self.writer is not None and self.config_text is not None:
            self.writer.write_text("config.yaml", self.config_text)
        elif self.writer is not None:  # a run from Python: its model's recipe, so `polytask.load`/`eval`/`predict` rebuild it
            from polytask.models.spec import model_spec

            spec = model_spec(self.model)
            if spec is not None:
                self.writer.write_text("model.json", json.dumps(spec, indent=1) + "\n")
        if self.writer is not None:
            self.writer.record_environment(epoch=self.epoch)

    # ---------------------------------------------------------------------------- batching
    def _eval_batches(self, data: Data) -> Iterator[Batch]:
        size = max(self.loop.batch_size, 1024)
        sets = [(None, data)] if isinstance(data, (MultiOutputDataset, TorchData)) else list(data.datasets.items())
        for name, ds in sets:
            for batch in ds.batches(size, source=name):
                # each rank evaluates its share; torchmetrics and the loss sums are reduced in compute()
                yield batch if self.comm is None else batch.shard(self.comm.rank, self.comm.world_size)

    # ----------------------------------------------------------------------------- helpers
    def _active(self, batch: Batch) -> list[str]:
        return [t for t in self.names if t in batch.targets]

    def _task(self, name: str) -> Task:
        return self.model.tasks[name]

    def _check_data(self, data: Data, split: str) -> None:
        if not isinstance(data, (MultiOutputDataset, TaskDatasets, TorchData)):
            raise DataError(f"{split} data must be a MultiOutputDataset, TaskDatasets or TorchData (a torch Dataset or "
                            f"DataLoader); found {type(data).__name__}")
        data.validate(self.tasks, where=f"{split} data")

    def _check_monitor(self, monitor: str) -> bool:
        if monitor == "loss":
            return False
        if monitor == "delta_m":
            if not self.baselines:
                raise InvalidParameterError("monitor 'delta_m' needs single-task `baselines`")
            return True
        task, _, metric = monitor.partition("/")
        if task not in self.names:
            raise InvalidParameterError(
                f"monitor '{monitor}': unknown task '{task}'.{closest(task, self.names)} "
                "Use 'loss', 'delta_m' or 'TASK/METRIC'")
        valid = self._task(task).metric_names
        if metric not in valid:
            raise InvalidParameterError(
                f"monitor '{monitor}': task '{task}' has no metric '{metric}'.{closest(metric, valid)} "
                f"Valid: {', '.join(valid)}")
        return METRICS.higher_is_better(metric)

    def _score(self, rows: list[dict[str, Any]]) -> float:
        split = "val" if any(r["split"] == "val" for r in rows) else "train"
        values: dict[str, dict[str, float]] = {}
        for r in rows:
            if r["split"] == split:
                values.setdefault(r["task"], {})[r["metric"]] = r["value"]
        if self.loop.monitor == "loss":
            return sum(v.get("loss", 0.0) for v in values.values()) / max(1, len(values))
        if self.loop.monitor == "delta_m":
            return delta_m(values, self.baselines, self.main_metrics)
        task, _, metric = self.loop.monitor.partition("/")
        return values[task][metric]

    def _rows(self, split: str, computed: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
        return [{"epoch": self.epoch + 1, "split": split, "task": t, "metric": m, "value": v}
                for t in self.names for m, v in computed.get(t, {}).items()]

    def model_state_dict(self) -> dict[str, Tensor]:
        """The model's parameters and buffers, whole (under FSDP: gathered, a collective every rank
        calls, unless the trainer gathered them for this moment's checkpoint)."""
        return self._full_state()[0]

    def _full_state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        if not self.sharded:
            return self.model.state_dict(), self.optimizer.state_dict()
        gathered = self._gathered or fsdp.full_state(self.model, self.optimizer)
        return gathered[0], gathered[1]  # type: ignore[return-value]

    def _load_model(self, state: Mapping[str, Tensor], optimizer: Mapping[str, Any] | None = None) -> None:
        """Load a model state (and optimiser state); under FSDP a full one is sliced to this rank's shards."""
        try:
            if self.sharded and not any(hasattr(v, "to_local") for v in state.values()):
                fsdp.load_full_state(self.model, state, self.optimizer, optimizer)
                return
            self.model.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(_mismatch(exc)) from None
        if optimizer is not None:
            self.optimizer.load_state_dict(optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue bit for bit (the engine holds the method's)."""
        model_state, optimizer_state = self._full_state()
        return {
            "model": model_state, "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "engine": self.engine.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(), "task_scheduler": self.task_scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": self.data_generator.get_state(),
                    "sampler": self.sampler_generator.get_state(), "schedule": self.schedule_generator.get_state()},
            "epoch_step": self.epoch_step, "epoch_rng": dict(self.epoch_rng),
            "weight_sums": dict(self.weight_sums), "weight_counts": dict(self.weight_counts),
            "train_metrics": self.metrics.state_dict(), "train_metrics_by_rank": self._rank_metrics,
            "health": self.health.state_dict(),
            "epoch": self.epoch, "step": self.step_index, "best": dict(self.best), "bad_epochs": self.bad_epochs,
            "history": list(self.history), "train_seconds": self.train_seconds + self._segment(),
            "callbacks": {cb.state_key: cb.state_dict() for cb in self.callbacks},
            "objectives": [o.state_dict() if isinstance(o, torch.nn.Module) else {} for o in self.objectives],
        }

    def _segment(self) -> float:
        """Seconds of this ``fit`` so far (0 outside one)."""
        return 0.0 if self._fit_started is None else time.perf_counter() - self._fit_started

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._load_model(state["model"], state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.engine.load_state_dict(state["engine"])
        self.sampler.load_state_dict(state["sampler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.task_scheduler.load_state_dict(state["task_scheduler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.data_generator.set_state(state["rng"]["data"])
        self.sampler_generator.set_state(state["rng"]["sampler"])
        self.schedule_generator.set_state(state["rng"]["schedule"])
        self.epoch_step, self.epoch_rng = state["epoch_step"], dict(state["epoch_rng"])
        self.weight_sums, self.weight_counts = dict(state["weight_sums"]), dict(state["weight_counts"])
        by_rank = state.get("train_metrics_by_rank")
        if self.comm is not None and by_rank is not None and len(by_rank) == self.comm.world_size:
            self.metrics.load_state_dict(by_rank[self.comm.rank])  # each rank its own share of the epoch so far
        elif self.is_main:
            self.metrics.load_state_dict(state["train_metrics"])
        else:  # only rank 0's partial-epoch metrics are in the file (another world size): the others restart
            self.metrics.reset()
        self.health.load_state_dict(state["health"])
        self.epoch, self.step_index = state["epoch"], state["step"]
        self.best, self.bad_epochs = dict(state["best"]), state["bad_epochs"]
        self.history, self.train_seconds = list(state["history"]), float(state["train_seconds"])
        for objective, saved_objective in zip(self.objectives, state.get("objectives", []), strict=False):
            if isinstance(objective, torch.nn.Module):
                objective.load_state_dict(saved_objective)
        saved = state["callbacks"]
        for callback in self.callbacks:
            if callback.state_key in saved:
                callback.load_state_dict(saved[callback.state_key])


def _mismatch(exc: RuntimeError) -> str:
    """torch's size-mismatch list, cut to the first parameters, as one sentence."""
    lines = [ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln or "Missing key" in ln
             or "Unexpected key" in ln]
    shown = "; ".join(lines[:3]) + (f"; and {len(lines) - 3} more" if len(lines) > 3 else "")
    return ("the checkpoint does not fit this model: the config's model or tasks changed since the run was saved "
            f"({shown or str(exc).splitlines()[0]}); resume with the run's own config.yaml, or start a new run")


def _build(registry: Registry, spec: Any, base: type, what: str) -> Any:
    """An object from a registry name, ``{"name": NAME, **params}`` or an instance of ``base``."""
    if isinstance(spec, base):
        return spec
    if isinstance(spec, str):
        return registry.create(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        params = {k: v for k, v in spec.items() if k != "name"}
        registry.check_params(spec["name"], params)
        return registry.create(spec["name"], **params)
    raise InvalidParameterError(f"`{what}` must be a registry name, {{'name': NAME, **params}} or a "
                                f"{base.__name__}; found {spec!r}")


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; under torchrun each rank takes its LOCAL_RANK GPU.

    Anything else must be a device whose backend is available here, or InvalidParameterError.
    """
    import os

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and "LOCAL_RANK" in os.environ:
        device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise InvalidParameterError(f"`device` must be 'auto', 'cpu', 'cuda' or 'cuda:N'; found {device!r}") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"`device` is {device!r} but CUDA is not available here; use 'cpu' or 'auto'")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InvalidParameterError(f"`device` is {device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if parsed.type not in ("cpu", "cuda", "mps") or (parsed.type == "mps" and not torch.backends.mps.is_available()):
        raise InvalidParameterError(f"`device` {device!r} is not usable here; expected 'auto', 'cpu' or an available 'cuda:N'")
    return parsed
