"""Feature distillation through task-specific adaptors.

Li & Bilen (2020), "Knowledge Distillation for Multi-task Learning", ECCV Workshops: a small
adaptor Aₜ per task maps the student's shared representation z to the space of task t's
single-task teacher, whose representation is fₜ(x); the loss is the distance between the
L2-normalised features,

    Lₜ^feat = ‖ Aₜ(z)/‖Aₜ(z)‖ − fₜ/‖fₜ‖ ‖²    (mean over the rows with a teacher representation),

normalised because the teachers' feature scales differ and would otherwise set the balance. The
adaptors are trained with the student (their own learning rate and weight decay, the paper's
separate optimiser settings) and thrown away after training.

Departures: the paper's adaptors are 1×1 convolutions on spatial feature maps; polytask's shared
representation is one vector per sample (flattened if not), so an adaptor is a linear map,
initialised to the identity when the widths agree (an untrained student starts at the teacher's
geometry instead of a random projection of it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.core.task import Task
from polytask.distill.objectives import DISTILLATION, Objective, _per_task, _select, feature_key


def feature_distance(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor | None:
    """Mean over rows of ‖s/‖s‖ − t/‖t‖‖² (rows flattened); None when ``mask`` keeps no row."""
    s = F.normalize(student.reshape(len(student), -1).float(), dim=1)
    t = F.normalize(teacher.reshape(len(teacher), -1).float(), dim=1)
    rows = (s - t).pow(2).sum(1)
    if mask is not None:
        if not bool(mask.any()):
            return None
        rows = rows[mask]
    return rows.mean()


@DISTILLATION.register("feature")
class FeatureDistillation(Objective):
    """Feature distillation with one linear adaptor per task (Li & Bilen, ECCV-W 2020).

    Adds the term ``TASK:feat`` = weight · ‖Aₜ(z)/‖Aₜ(z)‖ − fₜ/‖fₜ‖‖² per task, fₜ being the cached
    teacher representation (``teacher_features:TASK`` in the training data).

    Args:
        tasks: the student's tasks; ``only``: these tasks alone.
        student_dim: width of the student's (flattened) shared representation.
        teacher_dims: width of each teacher's representation (one number for all, or per task).
        weight: factor of the term (one, or one per task).
        lr, weight_decay: the adaptors' optimiser settings (default: the global ones).
    """

    def __init__(self, tasks: Sequence[Task], *, student_dim: int, teacher_dims: int | Mapping[str, int],
                 only: Sequence[str] | None = None, weight: float | Mapping[str, float] = 1.0,
                 lr: float | None = None, weight_decay: float | None = None) -> None:
        super().__init__()
        owner = "distillation 'feature'"
        self.tasks = _select(tasks, only, owner)
        dims = _per_task(teacher_dims, self.tasks, "teacher_dims", owner)
        for name, value in [("student_dim", student_dim), *((f"teacher_dims['{t}']", d) for t, d in dims.items())]:
            if not float(value).is_integer() or value < 1:
                raise InvalidParameterError(f"`{name}` of {owner} must be an int >= 1; found {value!r}")
        for name, value in (("lr", lr), ("weight_decay", weight_decay)):
            if value is not None and not (isinstance(value, (int, float)) and value >= 0):
                raise InvalidParameterError(f"`{name}` of {owner} must be a number >= 0; found {value!r}")
        self.weight = _per_task(weight, self.tasks, "weight", owner)
        self.student_dim, self.lr, self.weight_decay = int(student_dim), lr, weight_decay
        self.adaptors = nn.ModuleDict({t: nn.Linear(self.student_dim, int(d)) for t, d in dims.items()})
        with torch.no_grad():
            for adaptor in self.adaptors.values():
                if adaptor.in_features == adaptor.out_features:
                    adaptor.weight.copy_(torch.eye(adaptor.in_features))
                    adaptor.bias.zero_()
        self.terms = {f"{t}:feat": t for t in self.tasks}

    def parameter_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": list(self.adaptors.parameters()), "name": "distill:adaptors",
                 "lr": self.lr if self.lr is not None else lr,
                 "weight_decay": self.weight_decay if self.weight_decay is not None else weight_decay}]

    def forward(self, trainer: Any, batch: Any, outputs: Mapping[str, Tensor], features: Tensor,
                losses: Mapping[str, Tensor | None]) -> dict[str, Tensor | None]:
        out: dict[str, Tensor | None] = {}
        z = features.reshape(len(features), -1)
        if z.shape[1] != self.student_dim:
            raise ShapeError(f"distillation 'feature': the student's representation has {z.shape[1]} values per sample; "
                             f"the adaptors were built for student_dim={self.student_dim}")
        for name, adaptor in self.adaptors.items():
            key = feature_key(name)
            if name not in outputs or key not in batch.targets:
                continue
            teacher = batch.targets[key]
            if teacher.reshape(len(teacher), -1).shape[1] != adaptor.out_features:
                raise ShapeError(f"task '{name}': the cached teacher representation has "
                                 f"{teacher.reshape(len(teacher), -1).shape[1]} values per sample; expected "
                                 f"{adaptor.out_features} (teacher_dims)")
            term = feature_distance(adaptor(z.float()), teacher, batch.masks.get(key))
            out[f"{name}:feat"] = None if term is None else term * self.weight[name]
        return out
