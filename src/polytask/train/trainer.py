"""The training loop: forward, per-task losses, method → weights, one backward, metrics, logs."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from polytask.core.errors import DataError, InvalidParameterError, closest
from polytask.core.task import Task, task_names
from polytask.data.dataset import Batch, MultiOutputDataset, TaskDatasets
from polytask.data.loader import check_mode, epoch_batches, steps_in_epoch
from polytask.data.samplers import SAMPLERS, Sampler
from polytask.engine.backward import Engine
from polytask.engine.comm import Communicator
from polytask.methods.base import Method, get_method
from polytask.metrics.delta_m import delta_m
from polytask.metrics.registry import METRICS
from polytask.metrics.tracker import TaskMetrics
from polytask.models.base import MultiTaskModel
from polytask.scheduling import TASK_SCHEDULERS, TaskScheduler
from polytask.train.checkpoint import CheckpointError, load_checkpoint, load_latest, save_checkpoint
from polytask.train.health import GradientMonitor, HealthSettings
from polytask.train.optim import build_optimizer, build_scheduler, parameter_groups
from polytask.train.plots import plot_gradients, plot_training
from polytask.train.rundir import GRADIENT_FIELDS, METRIC_FIELDS, STEP_FIELDS, RunDir

Data = MultiOutputDataset | TaskDatasets


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
        method: registry name or Method; ``method_params`` go to its constructor.
        sampler: registry name or Sampler, used when each task has its own data set.
        task_scheduler: registry name or TaskScheduler: which tasks with data in a step train.
        loader_mode: how an epoch walks per-task data sets (``polytask.data.loader.LOADER_MODES``).
        steps_per_epoch: fixed number of steps per epoch (default: from the data sizes).
        epochs, batch_size, optimizer (adam|adamw|sgd), lr, weight_decay, momentum: the usual.
        scheduler: none|cosine|step|exponential (stepped once per epoch).
        monitor: what picks the best epoch and drives early stopping: ``loss`` (mean validation
            loss over tasks), ``TASK/METRIC`` or ``delta_m`` (needs ``baselines``).
        patience: epochs without improvement before stopping (None: never stop early).
        baselines: single-task metrics {task: {metric: value}} for Δm.
        clip: gradient clipping, any of ``norm`` (max global norm), ``value`` (max absolute
            value) and ``per_task`` (max norm of each task's gradient on θ, before aggregation).
        health: :class:`polytask.train.health.HealthSettings` fields: gradient-health logging
            every k steps and the policy (warn, skip, stop) for non-finite or exploding gradients.
        checkpoint_every: also write checkpoints/last.pt every N steps inside an epoch, so a
            killed run resumes mid-epoch exactly (default: at epoch ends only).
        engine: options of :class:`polytask.engine.Engine` (``mode``, ``every``, ``jacobian``,
            ``chunk_size``) plus ``scope``: ``auto`` (the method's), ``shared`` or ``last_shared``
            (per-task gradients on the last shared layer only, a cheap approximation).
        precision: ``32``, ``bf16`` (autocast; CPU or GPU) or ``16`` (fp16 autocast with a
            gradient scaler; GPU).
        output_dir: run directory (None: nothing written). resume / overwrite: see RunDir.
        config_text: the resolved YAML written to config.yaml.
    """

    def __init__(self, model: MultiTaskModel, tasks: Sequence[Task], *, method: str | Method = "static",
                 method_params: Mapping[str, Any] | None = None, sampler: str | Sampler = "proportional",
                 sampler_params: Mapping[str, Any] | None = None, task_scheduler: str | TaskScheduler = "all",
                 task_scheduler_params: Mapping[str, Any] | None = None, loader_mode: str = "sample",
                 steps_per_epoch: int | None = None, epochs: int = 10, batch_size: int = 256,
                 optimizer: str = "adam", lr: float = 1e-3, weight_decay: float = 0.0, momentum: float = 0.9,
                 scheduler: str = "none", monitor: str = "loss", patience: int | None = None,
                 baselines: Mapping[str, Mapping[str, float]] | None = None, clip: Mapping[str, float | None] | None = None,
                 health: Mapping[str, Any] | None = None, checkpoint_every: int | None = None,
                 engine: Mapping[str, Any] | None = None, precision: str = "32", output_dir: str | Path | None = None,
                 resume: bool = False, overwrite: bool = False, seed: int = 0, device: str = "cpu",
                 progress: bool = True, config_text: str | None = None) -> None:
        self.tasks = list(tasks)
        self.names = task_names(self.tasks)
        if not isinstance(model, MultiTaskModel):
            raise InvalidParameterError(f"model must be a polytask MultiTaskModel; found {type(model).__name__}")
        if set(model.task_names) != set(self.names):
            raise InvalidParameterError(f"model tasks {list(model.task_names)} differ from trainer tasks {list(self.names)}")
        for key, value, low in (("epochs", epochs, 1), ("batch_size", batch_size, 1)):
            if not isinstance(value, int) or value < low:
                raise InvalidParameterError(f"`{key}` must be an int >= {low}; found {value!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise InvalidParameterError(f"`lr` must be > 0; found {lr!r}")
        if patience is not None and (not isinstance(patience, int) or patience < 1):
            raise InvalidParameterError(f"`patience` must be an int >= 1 or None; found {patience!r}")
        self.device = resolve_device(device)
        self.comm = Communicator.from_env(self.device)
        self.model = model.to(self.device)
        if self.comm is not None:  # every rank starts from rank 0's parameters
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        self.method = get_method(method, **dict(method_params or {}))
        self.method.to(self.device)
        self.sampler = sampler if isinstance(sampler, Sampler) else SAMPLERS.create(sampler, **dict(sampler_params or {}))
        self.task_scheduler = (task_scheduler if isinstance(task_scheduler, TaskScheduler)
                               else TASK_SCHEDULERS.create(task_scheduler, **dict(task_scheduler_params or {})))
        check_mode(loader_mode)
        if steps_per_epoch is not None and (not isinstance(steps_per_epoch, int) or steps_per_epoch < 1):
            raise InvalidParameterError(f"`steps_per_epoch` must be an int >= 1 or None; found {steps_per_epoch!r}")
        self.loader_mode, self.steps_per_epoch = loader_mode, steps_per_epoch
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.baselines = {t: dict(v) for t, v in (baselines or {}).items()}
        self.monitor, self.patience = monitor, patience
        self.clip = _check_clip(clip)
        self.health = GradientMonitor(model, HealthSettings(**dict(health or {})))
        if checkpoint_every is not None and (not isinstance(checkpoint_every, int) or checkpoint_every < 1):
            raise InvalidParameterError(f"`checkpoint_every` must be an int >= 1 or None; found {checkpoint_every!r}")
        self.checkpoint_every = checkpoint_every
        self.higher_is_better = self._check_monitor(monitor)
        self.progress = progress
        options = dict(engine or {})
        scope = options.pop("scope", "auto")
        if scope not in ("auto", "shared", "last_shared"):
            raise InvalidParameterError(f"engine `scope` must be auto, shared or last_shared; found {scope!r}")
        scope = self.method.scope if scope == "auto" else scope
        shared = model.last_shared_parameters() if scope == "last_shared" else list(model.shared_parameters())
        self.engine = Engine(self.method, shared, seed=seed + 3, task_clip=self.clip.get("per_task"), comm=self.comm,
                             reduce_params=[*model.parameters(), *self.method.parameters()], **options)
        if precision not in ("32", "bf16", "16"):
            raise InvalidParameterError(f"`precision` must be 32, bf16 or 16; found {precision!r}")
        if precision == "16" and self.device.type != "cuda":
            raise InvalidParameterError("`precision` 16 (fp16 with a gradient scaler) needs a CUDA device; use bf16 on CPU")
        self.precision = precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler("cuda") if precision == "16" else None
        groups = parameter_groups(model, self.tasks, self.method.parameters(), lr=lr, weight_decay=weight_decay)
        self.optimizer = build_optimizer(optimizer, groups, lr=lr, momentum=momentum)
        self.scheduler = build_scheduler(scheduler, self.optimizer, epochs=epochs)
        self.data_generator = torch.Generator().manual_seed(seed + 1)
        self.sampler_generator = torch.Generator().manual_seed(seed + 2)
        self.schedule_generator = torch.Generator().manual_seed(seed + 4)
        self.run = RunDir(output_dir) if output_dir is not None else None
        self.writer = self.run if self.comm is None or self.comm.is_main else None  # only rank 0 writes
        self.resume, self.overwrite, self.config_text = resume, overwrite, config_text
        self.main_metrics = {t.name: t.main_metric for t in self.tasks}
        self.metrics = TaskMetrics(self.tasks, self.device)  # validates metric names early
        self.history: list[dict[str, Any]] = []
        self.steps: list[dict[str, Any]] = []
        self.epoch = 0
        self.step_index = 0
        self.epoch_step = 0  # steps done in the current epoch (> 0 only when resuming mid-epoch)
        self.epoch_rng: dict[str, Tensor] = {}
        self.weight_sums: dict[str, float] = {}
        self.weight_counts: dict[str, int] = {}
        self.best: dict[str, Any] = {"epoch": -1, "score": None}
        self.bad_epochs = 0
        self._last_plot = time.perf_counter()

    # ------------------------------------------------------------------------------- public API
    def check(self, train: Data, val: Data | None = None, test: Data | None = None) -> None:
        """Validate the data and set up method, sampler and scheduler; writes nothing.

        Everything that can reject the input happens here, before a run directory is touched.
        """
        for split, data in (("train", train), ("val", val), ("test", test)):
            if data is not None:
                self._check_data(data, split)
        if self.monitor != "loss" and val is None:
            raise InvalidParameterError(f"monitor '{self.monitor}' needs validation data")
        sizes = train.sizes if isinstance(train, TaskDatasets) else {t: len(train) for t in self.names}
        self.method.setup(self.names, sizes=sizes, static_weights={t.name: t.weight for t in self.tasks})
        if isinstance(train, TaskDatasets):
            self.sampler.setup({t: sizes[t] for t in self.names})
        self.task_scheduler.setup(self.names)

    def fit(self, train: Data, val: Data | None = None, test: Data | None = None) -> Report:
        """Train for ``epochs`` (or until early stopping) and return the report."""
        self.check(train, val, test)
        if self.writer is not None:
            self.writer.prepare(resume=self.resume, overwrite=self.overwrite)
        if self.comm is not None:
            torch.distributed.barrier()  # the run directory exists (and was checked) before any rank reads it
        if self.run is not None and self.resume:  # before config.yaml is rewritten: a mismatch leaves the run intact
            self._load_state(load_latest(self.run.last, self.run.previous))
            if self.run.best.exists():
                self._best_state = load_checkpoint(self.run.best)["model"]
        if self.writer is not None and self.config_text is not None:
            self.writer.write_text("config.yaml", self.config_text)
        started = time.perf_counter()
        while self.epoch < self.epochs and not self._should_stop():
            rows = self._train_epoch(train)
            if val is not None:
                rows += self._rows("val", self.evaluate(val))
            self.history.extend(rows)
            self._end_epoch(rows)
        summary = self._finish(train, val, test, time.perf_counter() - started)
        return Report(metrics=summary["tasks"], best_epoch=summary["best_epoch"], history=self.history, summary=summary)

    @torch.no_grad()
    def evaluate(self, data: Data) -> dict[str, dict[str, float]]:
        """Per-task metrics and mean loss on ``data`` (each task on its own set if per-task)."""
        self.model.eval()
        tracker = self.metrics
        tracker.reset()
        for batch in self._eval_batches(data):
            batch = batch.to(self.device)
            active = self._active(batch)
            outputs = self.model(batch.x, tasks=active, task=batch.source)
            losses = {t: self._task(t).loss(outputs[t], batch.targets[t], batch.masks.get(t)) for t in active}
            tracker.update(outputs, batch.targets, batch.masks, losses)
        return tracker.compute()

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
        total = self._steps_per_epoch(train)
        if self.epoch_step == 0:
            self.metrics.reset()
            self.weight_sums, self.weight_counts = {t: 0.0 for t in self.names}, {t: 0 for t in self.names}
            self.epoch_rng = {"data": self.data_generator.get_state(), "sampler": self.sampler_generator.get_state()}
        else:  # resuming mid-epoch: replay the epoch's draws up to where the checkpoint was taken
            self.data_generator.set_state(self.epoch_rng["data"])
            self.sampler_generator.set_state(self.epoch_rng["sampler"])
        batches = epoch_batches(train, self.batch_size, generator=self.data_generator, sampler=self.sampler,
                                sampler_generator=self.sampler_generator, step=self.step_index - self.epoch_step,
                                total_steps=total * self.epochs, mode=self.loader_mode,
                                steps_per_epoch=self.steps_per_epoch)
        for _ in range(self.epoch_step):
            next(batches)
        bar = tqdm(batches, total=total, initial=self.epoch_step, desc=f"epoch {self.epoch + 1}/{self.epochs}",
                   leave=False, disable=not self.progress or self.writer is None and self.comm is not None,
                   dynamic_ncols=True)
        for groups in bar:
            weights, losses = self._train_step([b.to(self.device) for b in groups])
            for t, w in weights.items():
                if losses.get(t) is not None:
                    self.weight_sums[t] += w
                    self.weight_counts[t] += 1
                    self.steps.append({"step": self.step_index, "epoch": self.epoch, "task": t,
                                       "loss": losses[t], "weight": w})
            self.step_index += 1
            self.epoch_step += 1
            if (self.writer is not None and self.checkpoint_every and self.epoch_step % self.checkpoint_every == 0
                    and self.epoch_step < total):
                save_checkpoint(self.writer.last, self._state(), previous=self.writer.previous)
        bar.close()
        self.epoch_step = 0
        computed = self.metrics.compute()
        for t in self.names:
            if self.weight_counts[t]:
                computed[t]["weight"] = self.weight_sums[t] / self.weight_counts[t]
        return self._rows("train", computed)

    def _train_step(self, groups: list[Batch]) -> tuple[dict[str, float], dict[str, float | None]]:
        """One update from a step's batches (one per data set drawn); only scheduled tasks train."""
        available = [t for t in self.names if any(t in b.targets for b in groups)]
        active = self.task_scheduler.select(self.step_index, available, self.schedule_generator)
        losses: dict[str, Tensor | None] = {}
        counts: dict[str, int] = {}
        features: list[Tensor] = []
        for batch in groups:
            tasks = [t for t in active if t in batch.targets and t not in losses]
            if not tasks:
                continue
            if self.comm is not None:
                batch = batch.shard(self.comm.rank, self.comm.world_size)
            with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                z = self.model.encode(batch.x, batch.source)
                outputs = self.model.decode(z, tasks)
                for t in tasks:
                    losses[t] = self._task(t).loss(outputs[t], batch.targets[t], batch.masks.get(t))
                    mask = batch.masks.get(t)
                    counts[t] = len(batch) if mask is None else int(mask.sum())
                    if losses[t] is None and self.comm is not None:
                        losses[t] = outputs[t].sum() * 0.0  # keeps this rank's graph like the others'
            features.append(z)
            self.metrics.update(outputs, batch.targets, batch.masks, {t: losses[t] for t in tasks})
        if self.comm is not None:
            losses = self._rank_weighted(losses, counts)
        present = [t for t, v in losses.items() if v is not None]
        values = torch.stack([losses[t] for t in present]).detach() if present else torch.zeros(0)  # type: ignore[misc]
        if self.comm is not None and present:
            values = self.comm.mean_(values.clone())
        loss_values = dict(zip(present, values.tolist(), strict=True))
        bad = [t for t, v in loss_values.items() if not math.isfinite(v)]
        if bad and self.health.non_finite_losses(self.step_index, bad):
            return {t: 0.0 for t in losses}, {t: loss_values.get(t) for t in losses}
        # with policy "skip", a dropped step must leave the method exactly as it was
        snapshot = (copy.deepcopy((self.method.state_dict(), self.engine.state_dict()))
                    if self.health.settings.policy == "skip" else None)
        self.optimizer.zero_grad(set_to_none=True)
        scale = self.scaler.get_scale() if self.scaler is not None else 1.0
        weights = self.engine.backward(losses, features=features, index=self.step_index, epoch=self.epoch,
                                       extra_loss=self.model.extra_loss(), scale=scale,
                                       diagnose=self.health.wants_gramian(self.step_index))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # before clipping, so thresholds are in true units
            # overflowing fp16 steps are the scaler's to skip; look only at finite ones
            skip = self.health.check(self.step_index, self.engine.last_tasks, self.engine.last_gramian) \
                if all(torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None) else False
        else:
            skip = self.health.check(self.step_index, self.engine.last_tasks, self.engine.last_gramian)
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            if snapshot is not None:
                self.method.load_state_dict(snapshot[0])
                self.engine.load_state_dict(snapshot[1])
            return {t: 0.0 for t in losses}, {t: loss_values.get(t) for t in losses}
        if self.clip.get("value") is not None:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), self.clip["value"])
        if self.clip.get("norm") is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip["norm"])
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.task_scheduler.observe(self.step_index, loss_values)
        return weights, {t: loss_values.get(t) for t in losses}

    def _rank_weighted(self, losses: dict[str, Tensor | None], counts: dict[str, int]) -> dict[str, Tensor | None]:
        """Scale each rank's per-task mean loss so that the mean over ranks is the global batch
        mean (shards and labelled counts may differ); tasks no rank has labels for drop out."""
        assert self.comm is not None
        names = list(losses)
        local = torch.tensor([float(counts.get(t, 0)) for t in names], dtype=torch.float64)
        total = self.comm.sum_(local.clone())
        out: dict[str, Tensor | None] = {}
        for i, t in enumerate(names):
            loss = losses[t]
            out[t] = None if loss is None or total[i] == 0 else loss * float(local[i] * self.comm.world_size / total[i])
        return out

    def _end_epoch(self, rows: list[dict[str, Any]]) -> None:
        train_losses = {r["task"]: r["value"] for r in rows if r["split"] == "train" and r["metric"] == "loss"}
        val_metrics: dict[str, dict[str, float]] = {}
        for r in rows:
            if r["split"] == "val":
                val_metrics.setdefault(r["task"], {})[r["metric"]] = r["value"]
        self.method.on_epoch_end(self.epoch, train_losses, val_metrics or None)
        if self.scheduler is not None:
            self.scheduler.step()
        score = self._score(rows)
        improved = self.best["score"] is None or (score > self.best["score"] if self.higher_is_better
                                                  else score < self.best["score"])
        self.epoch += 1
        if improved:
            self.best = {"epoch": self.epoch, "score": score}
            self.bad_epochs = 0
        else:
            self.bad_epochs += 1
        if improved:
            self._best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.writer is not None:
            if improved:
                save_checkpoint(self.writer.best, {"model": self.model.state_dict(), "epoch": self.epoch})
            save_checkpoint(self.writer.last, self._state(), previous=self.writer.previous)
            self.writer.write_csv("metrics.csv", METRIC_FIELDS, self.history)
            self.writer.write_csv("steps.csv", STEP_FIELDS, self.steps)
            if self.health.rows:
                self.writer.write_csv("gradients.csv", GRADIENT_FIELDS, self.health.rows)
            # drawing costs ~1 s: refresh the pictures of a long run at most every 30 s, and at the end
            if time.perf_counter() - self._last_plot > 30:
                self._plot()

    def _plot(self) -> None:
        assert self.writer is not None
        plot_training(self.writer.path / "training.png", self.history, self.main_metrics)
        if self.health.rows:
            plot_gradients(self.writer.path / "gradients.png", self.health.rows)
        self._last_plot = time.perf_counter()

    def _should_stop(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    def _finish(self, train: Data, val: Data | None, test: Data | None, seconds: float) -> dict[str, Any]:
        if self._best_state is not None:
            self.model.load_state_dict(self._best_state)
        split, data = ("test", test) if test is not None else ("val", val) if val is not None else ("train", train)
        final = self.evaluate(data)
        summary: dict[str, Any] = {
            "tasks": final, "split": split, "best_epoch": self.best["epoch"], "epochs_run": self.epoch,
            "monitor": self.monitor, "method": type(self.method).registry_name,  # type: ignore[attr-defined]
            "main_metrics": self.main_metrics, "train_seconds": round(seconds, 2),
            "health_events": self.health.events,
        }
        if self.baselines:
            summary["baselines"] = self.baselines
            summary["delta_m"] = delta_m(final, self.baselines, self.main_metrics)
        if self.writer is not None:
            if self.history:
                self._plot()
            self.writer.write_json("summary.json", summary)
        return summary

    # ---------------------------------------------------------------------------- batching
    def _eval_batches(self, data: Data) -> Iterator[Batch]:
        size = max(self.batch_size, 1024)
        sets = [(None, data)] if isinstance(data, MultiOutputDataset) else list(data.datasets.items())
        for name, ds in sets:
            for batch in ds.batches(size, source=name):
                # each rank evaluates its share; torchmetrics and the loss sums are reduced in compute()
                yield batch if self.comm is None else batch.shard(self.comm.rank, self.comm.world_size)

    def _steps_per_epoch(self, train: Data) -> int:
        return steps_in_epoch(train, self.batch_size, self.loader_mode, self.steps_per_epoch)

    # ----------------------------------------------------------------------------- helpers
    _best_state: dict[str, Tensor] | None = None

    def _active(self, batch: Batch) -> list[str]:
        return [t for t in self.names if t in batch.targets]

    def _task(self, name: str) -> Task:
        return self.model.tasks[name]

    def _check_data(self, data: Data, split: str) -> None:
        if not isinstance(data, (MultiOutputDataset, TaskDatasets)):
            raise DataError(f"{split} data must be a MultiOutputDataset or TaskDatasets; found {type(data).__name__}")
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
        if self.monitor == "loss":
            return sum(v.get("loss", 0.0) for v in values.values()) / max(1, len(values))
        if self.monitor == "delta_m":
            return delta_m(values, self.baselines, self.main_metrics)
        task, _, metric = self.monitor.partition("/")
        return values[task][metric]

    def _rows(self, split: str, computed: Mapping[str, Mapping[str, float]]) -> list[dict[str, Any]]:
        return [{"epoch": self.epoch + 1, "split": split, "task": t, "metric": m, "value": v}
                for t in self.names for m, v in computed.get(t, {}).items()]

    def _state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "method": self.method.state_dict(), "engine": self.engine.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "sampler": self.sampler.state_dict(), "task_scheduler": self.task_scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "data": self.data_generator.get_state(),
                    "sampler": self.sampler_generator.get_state(), "schedule": self.schedule_generator.get_state()},
            "epoch_step": self.epoch_step, "epoch_rng": dict(self.epoch_rng),
            "weight_sums": dict(self.weight_sums), "weight_counts": dict(self.weight_counts),
            "train_metrics": self.metrics.state_dict(), "health": self.health.state_dict(),
            "epoch": self.epoch, "step": self.step_index, "best": dict(self.best), "bad_epochs": self.bad_epochs,
            "history": list(self.history), "steps": list(self.steps),
        }

    def _load_state(self, state: Mapping[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
        except RuntimeError as exc:
            raise CheckpointError(f"the checkpoint does not fit this model (was the config changed?): {exc}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.method.load_state_dict(state["method"])
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
        if self.comm is None or self.comm.is_main:
            self.metrics.load_state_dict(state["train_metrics"])
        else:  # rank 0's partial-epoch metrics are in the file; the other ranks restart theirs
            self.metrics.reset()
        self.health.load_state_dict(state["health"])
        self.epoch, self.step_index = state["epoch"], state["step"]
        self.best, self.bad_epochs = dict(state["best"]), state["bad_epochs"]
        self.history, self.steps = list(state["history"]), list(state["steps"])


def _check_clip(clip: Mapping[str, float | None] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in dict(clip or {}).items():
        if key not in ("norm", "value", "per_task"):
            raise InvalidParameterError(f"unknown clip setting '{key}'.{closest(key, ('norm', 'value', 'per_task'))} "
                                        "Valid: norm, value, per_task")
        if value is None:
            continue
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise InvalidParameterError(f"clip `{key}` must be a finite number > 0; found {value!r}")
        out[key] = float(value)
    return out


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
