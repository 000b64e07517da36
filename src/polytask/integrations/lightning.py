"""Every polytask method inside a user's own ``lightning.Trainer``: :class:`MultiTaskModule`.

``MultiTaskModule(model, method="upgrad")`` is a ``LightningModule`` that trains a polytask
:class:`~polytask.models.MultiTaskModel` with manual optimisation: each training step computes
the per-task losses (override :meth:`MultiTaskModule.task_losses` for losses of your own), hands
them to a polytask :class:`~polytask.Engine` — which writes the combined update into ``.grad``
and keeps the method's state — clips, and steps the optimiser. What Lightning users rely on keeps
working:

* **precision**: ``bf16-mixed`` (autocast, on CPU too) and ``16-mixed`` (with Lightning's
  gradient scaler: the engine takes the scaled per-task gradients and unscales them before the
  method sees them, and clipping is done in the scaled units, so the scaler's own unscale and
  overflow skip stay Lightning's);
* **gradient clipping**: ``clip`` (global norm, in true units) and ``task_clip`` (each task's
  gradient on θ before the method combines them); Lightning's ``gradient_clip_val`` is for
  automatic optimisation only, as Lightning itself says;
* **DDP**: under ``strategy="ddp"`` (or ``ddp_spawn``) the engine communicates what the method
  needs — task losses, task Jacobians or Gramians — and all-reduces the final update once, in
  place of DDP's gradient hooks, which manual optimisation leaves idle unless
  ``manual_backward`` is called (it is not). Each rank's loss is weighted by its labelled count,
  so the update equals one process on the global batch. Under ``ddp_spawn`` the processes that
  trained hand the parent the module's ``state_dict`` alone (Lightning's own rule): the model's
  parameters and the method's buffers come back, the engine's step counter and routes do not,
  and ``module.engine`` is None in the parent after ``fit``;
* **logging**: per-task losses and task weights go through ``self.log`` to whatever loggers the
  Trainer has (``train/loss/TASK``, ``train/weight/TASK``, ``val/loss/TASK`` and the tasks'
  validation metrics ``val/TASK/METRIC``);
* **schedules**: ``optim.scheduler`` steps once an epoch, at its end, as in polytask's Trainer
  (under manual optimisation Lightning leaves that to the module);
* **checkpoints**: the engine's state (method state, step counter) is saved in Lightning's
  checkpoint and restored on resume.

Batches are anything :func:`polytask.data.torch_data.to_batch` reads: ``(x, {task: y})``,
``(x, {task: y}, {task: mask})``, ``{"x": x, TASK: y, "masks": …}`` or a polytask ``Batch``.
Needs ``pip install 'polytask[lightning]'``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.core.options import options
from polytask.core.task import Task
from polytask.data.dataset import Batch
from polytask.data.torch_data import to_batch
from polytask.engine.backward import Engine
from polytask.engine.comm import Communicator
from polytask.engine.options import EngineOptions
from polytask.methods.base import METHODS, Method
from polytask.metrics.tracker import TaskMetrics
from polytask.models.base import MultiTaskModel
from polytask.train.optim import build_optimizer, build_scheduler, parameter_groups
from polytask.train.options import OptimOptions

try:
    import lightning.pytorch as pl
except ImportError as exc:  # pragma: no cover - the message is the point
    raise ImportError("polytask's Lightning integration needs the lightning package: "
                      "pip install 'polytask[lightning]'") from exc


def _method(spec: str | Mapping[str, Any] | Method) -> Method:
    if isinstance(spec, Method):
        return spec
    if isinstance(spec, str):
        return METHODS.create(spec)
    if isinstance(spec, Mapping) and "name" in spec:
        params = {k: v for k, v in spec.items() if k != "name"}
        return METHODS.create(spec["name"], **params)
    raise InvalidParameterError(f"method must be a registered name, {{'name': NAME, **params}} or a Method; found {spec!r}")


class MultiTaskModule(pl.LightningModule):
    """A LightningModule training ``model`` with a polytask method (see the module docstring).

    Args:
        model: the multi-task architecture. tasks: its tasks (default: the model's, in order).
        method: a registry name, ``{"name": NAME, **params}`` or a Method object.
        engine: :class:`~polytask.engine.options.EngineOptions` (compare, heads, every, …).
        optim: :class:`~polytask.train.options.OptimOptions` (optimizer, lr, weight_decay,
            momentum, scheduler, clip); the per-task ``lr``/``weight_decay`` of the tasks hold.
        seed: seeds the engine's random stream (methods that draw random numbers).
    """

    def __init__(self, model: MultiTaskModel, tasks: Sequence[Task] | None = None, method: Any = "equal", *,
                 engine: EngineOptions | Mapping[str, Any] | None = None,
                 optim: OptimOptions | Mapping[str, Any] | None = None, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(model, MultiTaskModel):
            raise InvalidParameterError(f"model must be a polytask MultiTaskModel; found {type(model).__name__}")
        self.automatic_optimization = False  # the engine writes .grad; Lightning steps the optimiser
        self.model = model
        self.tasks = list(tasks) if tasks is not None else [model.tasks[n] for n in model.task_names]
        if [t.name for t in self.tasks] != list(model.task_names) and set(t.name for t in self.tasks) != set(
                model.task_names):
            raise InvalidParameterError(f"tasks {[t.name for t in self.tasks]} differ from the model's "
                                        f"{list(model.task_names)}")
        self.names = [t.name for t in self.tasks]
        self.method = _method(method)
        self.engine_options = options(EngineOptions, engine, "engine")
        self.optim_options = options(OptimOptions, optim, "optim")
        self.seed = seed
        self.engine: Engine | None = None
        self._engine_state: dict[str, Any] | None = None
        self._val_metrics: TaskMetrics | None = None
        self._last_val: dict[str, dict[str, float]] | None = None
        self._epoch_loss: dict[str, float] = {}
        self._epoch_count: dict[str, int] = {}

    # ------------------------------------------------------------------------------- set-up
    def setup(self, stage: str) -> None:
        if self.engine is not None:
            return
        comm = None
        if torch.distributed.is_available() and torch.distributed.is_initialized() and (
                torch.distributed.get_world_size() > 1):
            comm = Communicator(torch.distributed.get_rank(), torch.distributed.get_world_size())
        trainable = [*self.model.parameters(), *self.method.parameters()]
        self.engine = Engine(self.method, self.model.shared_parameters(),
                             last_shared_params=self.model.last_shared_parameters(), **self.engine_options.model_dump(),
                             seed=self.seed, task_clip=self.optim_options.clip.per_task, comm=comm,
                             reduce_params=trainable, params=trainable)
        if not self.method.is_set_up:
            self.method.setup(self.names, sizes={t: 1 for t in self.names},
                              static_weights={t.name: t.weight for t in self.tasks})
        if self._engine_state is not None:  # a checkpoint was loaded before set-up
            self.engine.load_state_dict(self._engine_state)
            self._engine_state = None

    def configure_optimizers(self) -> Any:
        o = self.optim_options
        groups = parameter_groups(self.model, self.tasks, self.method.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        optimizer = build_optimizer(o.optimizer, groups, lr=o.lr, momentum=o.momentum, fused=o.fused)
        epochs = self.trainer.max_epochs if self.trainer is not None else None
        if o.scheduler == "cosine" and (epochs is None or epochs < 1):
            # its period is the run's epochs (it steps once an epoch): without max_epochs it would be 1
            raise InvalidParameterError("optim.scheduler 'cosine' anneals over the run's epochs: give the "
                                        "lightning.Trainer max_epochs (found max_epochs="
                                        f"{epochs!r}), or use scheduler 'step' or 'exponential'")
        scheduler = build_scheduler(o.scheduler, optimizer, epochs=epochs if epochs and epochs > 0 else 1)
        return optimizer if scheduler is None else {"optimizer": optimizer, "lr_scheduler": scheduler}

    # ------------------------------------------------------------------------------ the step
    def forward(self, x: Tensor, tasks: Sequence[str] | None = None, task: str | None = None) -> dict[str, Tensor]:
        return self.model(x, tasks=tasks, task=task)

    def task_losses(self, batch: Batch) -> tuple[dict[str, Tensor | None], dict[str, int], list[Tensor], dict[str, Tensor]]:
        """Per-task losses of a batch (None: no labelled sample), labelled counts, the shared
        representation and the outputs. Override for losses of your own."""
        tasks = [t for t in self.names if t in batch.targets]
        z = self.model.encode(batch.x, batch.source)
        outputs = self.model.decode(z, tasks)
        losses: dict[str, Tensor | None] = {t: None for t in self.names}
        counts: dict[str, int] = {t: 0 for t in self.names}
        for t in tasks:
            mask = batch.masks.get(t)
            losses[t] = self.model.tasks[t].loss(outputs[t], batch.targets[t], mask)
            counts[t] = len(batch) if mask is None else int(mask.sum())
        return losses, counts, [z], outputs

    def _batch(self, raw: Any, where: str) -> Batch:
        return to_batch(raw, self.tasks, where, None).to(self.device)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        assert self.engine is not None, "setup() builds the engine"
        data = self._batch(batch, f"train batch {batch_idx}")
        losses, counts, features, _ = self.task_losses(data)
        for t, loss in losses.items():  # the epoch's mean training loss per task, for methods that look at it
            if loss is not None:
                self._epoch_loss[t] = self._epoch_loss.get(t, 0.0) + float(loss.detach()) * counts[t]
                self._epoch_count[t] = self._epoch_count.get(t, 0) + counts[t]
        if self.engine.comm is not None:
            losses = self._rank_weighted(losses, counts)
        optimizer = self.optimizers()
        optimizer.zero_grad(set_to_none=True)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        # through scaler.scale, not get_scale: the scaler makes its scale tensor on its first scale call,
        # and its unscale_ in optimizer.step fails without one (the engine scales the losses itself)
        scale = float(scaler.scale(torch.ones((), device=self.device))) if scaler is not None else 1.0
        # a step the scaler will skip (its gradients overflowed) must leave the method as it was: FAMO's
        # logits would learn from two losses of one model
        snapshot = copy.deepcopy(self.engine.state_dict()) if scaler is not None else None
        report = self.engine.backward(losses, features=features, epoch=self.current_epoch,
                                      extra_loss=self.model.extra_loss(), scale=scale)
        if snapshot is not None and not all(torch.isfinite(p.grad).all() for p in self.model.parameters()
                                            if p.grad is not None):
            self.engine.load_state_dict(snapshot)
        # as polytask's Trainer clips: the model's parameters (not a method's own, such as uncertainty's
        # log-variances), by value and then by norm; in the scaled units the .grad are in (the scaler
        # unscales in optimizer.step), which clips exactly as in true units
        clip = self.optim_options.clip
        if clip.value is not None:
            torch.nn.utils.clip_grad_value_(self.model.parameters(), clip.value * scale)
        if clip.norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip.norm * scale)
        optimizer.step()
        # each task's loss on the global batch (the report's: under DDP the mean over ranks of the
        # rank-weighted losses, which is the labelled rows' mean over every rank, the same on each; a
        # rank's own loss reached the logger from rank 0 alone), and the weights of the tasks that had
        # a loss this step: an epoch's mean weight is over those steps, as the Trainer's
        logged = {f"train/loss/{t}": report.losses[i] for i, t in enumerate(report.tasks)}
        logged |= {f"train/weight/{t}": report.weights[t] for t in report.tasks}
        if logged:
            self.log_dict(logged, on_step=True, on_epoch=True, batch_size=len(data))

    def _rank_weighted(self, losses: dict[str, Tensor | None], counts: dict[str, int]) -> dict[str, Tensor | None]:
        """Each rank's mean loss scaled so that the mean over ranks is the global batch mean."""
        assert self.engine is not None and self.engine.comm is not None
        comm = self.engine.comm
        local = torch.tensor([float(counts[t]) for t in self.names], dtype=torch.float64)
        total = comm.sum_(local.clone())
        out: dict[str, Tensor | None] = {}
        for i, t in enumerate(self.names):
            loss = losses[t]
            if total[i] == 0:
                out[t] = None
            elif loss is None:  # other ranks have labels: a zero that keeps this rank's collectives in step
                out[t] = sum(p.sum() for p in self.model.task_parameters(t)) * 0.0
            else:
                out[t] = loss * float(local[i] * comm.world_size / total[i])
        return out

    def on_train_epoch_end(self) -> None:
        """The method's end-of-epoch hook (DWA, DTP, STCH, warm-up) with the epoch's mean training
        loss per task over all ranks and the validation metrics of this epoch, as the Trainer does."""
        loss, count = self._epoch_sums()
        train_losses = {t: loss[t] / count[t] for t in loss}
        self.method.on_epoch_end(self.current_epoch, train_losses, self._last_val)
        self._epoch_loss, self._epoch_count, self._last_val = {}, {}, None
        # manual optimisation leaves the schedulers to the module: once an epoch, as polytask's Trainer
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _epoch_sums(self) -> tuple[dict[str, float], dict[str, int]]:
        """The epoch's training-loss sums and labelled counts per task so far, summed over ranks
        (every rank takes part: a collective under DDP). Every task in the module's order on every
        rank: a rank's dict holds a task from its first labelled batch on, so two ranks' dicts could
        differ in length or order, and a sum of them mixed two tasks' losses."""
        sums = torch.tensor([[self._epoch_loss.get(t, 0.0), float(self._epoch_count.get(t, 0))] for t in self.names],
                            dtype=torch.float64)
        if self.engine is not None and self.engine.comm is not None:
            sums = self.engine.comm.sum_(sums)
        return ({t: float(sums[i, 0]) for i, t in enumerate(self.names) if sums[i, 1] > 0},
                {t: int(sums[i, 1]) for i, t in enumerate(self.names) if sums[i, 1] > 0})

    def on_train_end(self) -> None:
        """Free what the engine keeps between steps (J's storage), as the Trainer does when fit ends."""
        if self.engine is not None:
            self.engine.release_memory()

    # ---------------------------------------------------------------------------- validation
    def on_validation_epoch_start(self) -> None:
        self._val_metrics = TaskMetrics(self.tasks, self.device)
        self._val_metrics.reset()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        data = self._batch(batch, f"validation batch {batch_idx}")
        losses, _, _, outputs = self.task_losses(data)
        assert self._val_metrics is not None
        present = {t: v for t, v in losses.items() if v is not None}
        self._val_metrics.update(outputs, data.targets, data.masks, present)

    def on_validation_epoch_end(self) -> None:
        if self._val_metrics is None or self.trainer.sanity_checking:  # a sanity check is no epoch's result
            return
        computed = self._val_metrics.compute()
        self._last_val = {t: dict(m) for t, m in computed.items()}
        logged = {}
        for task, metrics in computed.items():
            for metric, value in metrics.items():
                logged[f"val/{'loss/' + task if metric == 'loss' else task + '/' + metric}"] = float(value)
        if logged:
            self.log_dict(logged, sync_dist=False)  # TaskMetrics already reduced across ranks

    # ---------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.engine is not None:
            checkpoint["polytask_engine"] = self.engine.state_dict()
        # the epoch so far, for the method's end-of-epoch hook after a resume from the middle of an epoch:
        # every rank's sums together (Lightning calls this hook on every rank and writes rank 0's
        # checkpoint, which held rank 0's share alone), which rank 0 takes back on a resume
        loss, count = self._epoch_sums()
        checkpoint["polytask_epoch"] = {"loss": loss, "count": count, "val": self._last_val}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        epoch = checkpoint.get("polytask_epoch")
        if epoch is not None:
            # the sums of all ranks: rank 0 resumes them, the others start from none, so that their sum at
            # the epoch's end is the run's, whatever the world size of the resumed run
            first = self.global_rank == 0
            self._epoch_loss = dict(epoch["loss"]) if first else {}
            self._epoch_count = dict(epoch["count"]) if first else {}
            self._last_val = epoch["val"]
        state = checkpoint.get("polytask_engine")
        if state is None:
            return
        if self.engine is None:
            self._engine_state = state
        else:
            self.engine.load_state_dict(state)
