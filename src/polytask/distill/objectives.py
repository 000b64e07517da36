"""Distillation objectives: extra named loss terms the Trainer adds to the tasks' own.

An objective is given to ``Trainer(objectives=[...])``. At every training forward it receives the
batch, the student's outputs, its shared representation z and the tasks' losses, and returns
named terms (``"income:kd"``). The method is set up with the task names followed by the term
names, so any weighting or gradient method (equal, uncertainty, nash_mtl, …) balances a
distillation term exactly like a task; a returned term named like a task replaces that task's
loss (the annealed supervised term λ·Lₜ). A term is ``None`` when it has nothing to say this step
(λ = 1, no teacher output in the batch): the engine then leaves it out, as it does a task
without labels.

The teachers never run here: their outputs ride in the training data as extra per-row targets
named ``teacher:TASK`` (logits or predictions) and ``teacher_features:TASK`` (representations),
sliced with every batch (see :mod:`polytask.distill.teachers`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, closest
from polytask.core.registry import Registry
from polytask.core.task import Task
from polytask.distill.annealing import Schedule, build_schedule
from polytask.distill.kd import check_temperature, kd_loss

TEACHER = "teacher:"
TEACHER_FEATURES = "teacher_features:"


def teacher_key(task: str) -> str:
    """The data set key of task ``task``'s cached teacher outputs."""
    return TEACHER + task


def feature_key(task: str) -> str:
    """The data set key of task ``task``'s cached teacher representation."""
    return TEACHER_FEATURES + task


def progress(trainer: Any) -> float:
    """Training progress p ∈ [0, 1]: the Trainer's step index over the run's total steps."""
    total = max(1, int(getattr(trainer, "steps_this_epoch", 0) or 1) * int(trainer.loop.epochs))
    return min(1.0, trainer.step_index / total)


class Objective(nn.Module):
    """Base of the Trainer's extra objectives.

    ``terms`` maps each loss term the objective adds to the task it belongs to (the Trainer gives
    the method a term's data size and static weight from its task). ``forward(trainer, batch,
    outputs, features, losses)`` returns ``{term: scalar or None}``. Parameters of an objective
    (feature adaptors) are optimised in the groups ``parameter_groups`` returns, and saved in the
    Trainer's checkpoints with the objective's ``state_dict``.
    """

    terms: dict[str, str]

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "name": f"objective:{type(self).__name__}", "lr": lr,
                 "weight_decay": weight_decay}] if params else []


def _select(tasks: Sequence[Task], names: Sequence[str] | None, owner: str) -> dict[str, Task]:
    by_name = {t.name: t for t in tasks}
    if names is None:
        return by_name
    for name in names:
        if name not in by_name:
            raise InvalidParameterError(f"{owner} names unknown task '{name}'.{closest(name, by_name)} "
                                        f"Tasks: {', '.join(by_name)}")
    return {name: by_name[name] for name in names}


def _per_task(value: float | Mapping[str, float], tasks: Mapping[str, Task], what: str, owner: str) -> dict[str, float]:
    if isinstance(value, Mapping):
        for name in value:
            if name not in tasks:
                raise InvalidParameterError(f"`{what}` of {owner} names unknown task '{name}'.{closest(name, tasks)}")
        return {t: float(value.get(t, 1.0)) for t in tasks}
    return {t: float(value) for t in tasks}


DISTILLATION: Registry[Objective] = Registry("distillation objective")


@DISTILLATION.register("output")
class OutputDistillation(Objective):
    """Output distillation with teacher annealing: per task, λ·Lₜ(y) + (1 − λ)·KDₜ(teacher).

    KDₜ is the temperature-scaled KL with the T² correction for classification and the MSE to the
    teacher's prediction for regression (Hinton et al. 2015; :mod:`polytask.distill.kd`); λ follows
    ``anneal`` over training (Clark et al., ACL 2019, BAM!: linear 0 → 1; a number is a fixed
    mixture). For cross-entropy losses λ·CE(y) + (1 − λ)·CE(teacher) is the cross-entropy with the
    mixed target λ·y + (1 − λ)·teacher, the paper's formulation; it is returned as two terms,
    ``TASK`` (λ·Lₜ, over the labelled rows) and ``TASK:kd`` ((1 − λ)·weight·KDₜ, over every row with a
    teacher output, labelled or not: a sample without a label still learns from its teacher).

    Args:
        tasks: the student's tasks; ``only``: distil these tasks alone (default: every task).
        temperature: T (one number, or one per task; regression ignores it).
        anneal: the λ schedule: a name in ``ANNEALING`` (``linear``), ``{name: NAME, **params}``
            or a number (the fixed mixture λ; 0 = distillation alone).
        weight: factor of the distillation term (one, or one per task), on top of 1 − λ.

    Departures: the teacher term uses KL instead of soft cross-entropy (same gradient, minus the
    teacher's entropy, a constant); at λ = 1 the distillation term is left out (None) and the task
    term is its plain loss, so the run is exactly plain supervised training; at λ = 0 the task term
    is left out instead of a zero loss (a zero gradient would distort gradient methods such as
    MGDA).
    """

    def __init__(self, tasks: Sequence[Task], *, only: Sequence[str] | None = None,
                 temperature: float | Mapping[str, float] = 1.0, anneal: Any = "linear",
                 weight: float | Mapping[str, float] = 1.0) -> None:
        super().__init__()
        owner = "distillation 'output'"
        self.tasks = _select(tasks, only, owner)
        self.temperature = {t: check_temperature(v, owner) for t, v in _per_task(temperature, self.tasks,
                                                                                 "temperature", owner).items()}
        self.weight = _per_task(weight, self.tasks, "weight", owner)
        for t, w in self.weight.items():
            if not w >= 0:
                raise InvalidParameterError(f"`weight` of {owner} for task '{t}' must be >= 0; found {w!r}")
        self.schedule: Schedule = build_schedule(anneal)
        self.terms = {f"{t}:kd": t for t in self.tasks}

    def mixture(self, trainer: Any) -> float:
        """λ at the trainer's current step."""
        return self.schedule(progress(trainer))

    def forward(self, trainer: Any, batch: Any, outputs: Mapping[str, Tensor], features: Tensor,
                losses: Mapping[str, Tensor | None]) -> dict[str, Tensor | None]:
        lam = self.mixture(trainer)
        out: dict[str, Tensor | None] = {}
        for name, task in self.tasks.items():
            key = teacher_key(name)
            if name not in outputs or key not in batch.targets:
                continue
            if lam < 1.0:
                kd = kd_loss(outputs[name], batch.targets[key], task.kind, temperature=self.temperature[name],
                             mask=batch.masks.get(key), task=name)
                out[f"{name}:kd"] = None if kd is None or self.weight[name] == 0 else kd * ((1.0 - lam) * self.weight[name])
                own = losses.get(name)
                if own is not None:
                    out[name] = own * lam if lam > 0.0 else None
            else:
                out[f"{name}:kd"] = None
        return out

    def extra_repr(self) -> str:
        return f"tasks={list(self.tasks)}, temperature={self.temperature}, anneal={self.schedule!r}"
