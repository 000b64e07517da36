"""Teachers and their cached outputs: one single-task model (or any predictor) per task.

A teacher of task t is a polytask model that has task t (a single-task run, or any
``MultiTaskModel``), a run directory (``polytask.load``), a plain ``nn.Module`` mapping inputs to
task t's raw output, or the cached predictions themselves (a tensor, one row per training sample).
Its outputs on the training rows are computed once, stored in a cache file and attached to the
training data as the per-row targets ``teacher:TASK`` (and ``teacher_features:TASK``), so the
student's steps only slice them (:mod:`polytask.distill.objectives`).

The cache is keyed by the data set fingerprint (SHA-256 of the inputs a teacher read: their
shape, dtype and bytes) and each teacher's hash (SHA-256 of its weights or of the given
predictions). A cache whose keys differ from the data and teachers at hand is refused with an
error naming the task, never reused: its outputs belong to other rows or another model.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from polytask.core.errors import ConfigError, DataError, InvalidParameterError, ShapeError, closest
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset, TaskDatasets
from polytask.distill.objectives import feature_key, teacher_key
from polytask.models.base import MultiTaskModel

FORMAT = "polytask-teacher-cache/1"
Data = MultiOutputDataset | TaskDatasets


def tensor_hash(*tensors: Tensor, names: Sequence[str] = ()) -> str:
    """SHA-256 of tensors' names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for i, tensor in enumerate(tensors):
        digest.update(f"{names[i] if i < len(names) else i}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        t = tensor.detach().cpu().contiguous().reshape(-1)  # 0-d buffers (BatchNorm counters) too
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def fingerprint(ds: MultiOutputDataset) -> str:
    """The data set key of a cache: the hash of the inputs a teacher reads (its outputs depend on nothing else)."""
    return tensor_hash(ds.x, names=("x",))


def module_hash(module: nn.Module) -> str:
    """The teacher key of a cache: the hash of a module's weights and buffers."""
    state = module.state_dict()
    return tensor_hash(*state.values(), names=list(state))


@dataclass
class Teacher:
    """Task ``task``'s teacher: ``source`` is a MultiTaskModel with that task, a plain nn.Module
    (inputs → raw output) or a tensor of its outputs on the training rows (cached predictions)."""

    task: Task
    source: MultiTaskModel | nn.Module | Tensor
    name: str = ""
    key: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self.key = tensor_hash(self.source, names=("predictions",)) if isinstance(self.source, Tensor) \
            else module_hash(self.source)

    @property
    def has_features(self) -> bool:
        return isinstance(self.source, MultiTaskModel)

    @torch.no_grad()
    def run(self, x: Tensor, *, batch_size: int = 1024, features: bool = False,
            source: str | None = None) -> tuple[Tensor, Tensor | None]:
        """The teacher's raw outputs on ``x`` (canonical shape) and, with ``features``, its representation.
        ``source``: the task whose data set ``x`` is (per-task data sets), as the Trainer passes it."""
        where = f"teacher of task '{self.task.name}'{f' ({self.name})' if self.name else ''}"
        if isinstance(self.source, Tensor):
            if features:
                raise InvalidParameterError(f"{where} is a tensor of cached predictions, which holds no representation; "
                                            "feature distillation needs a teacher model")
            if len(self.source) != len(x):
                raise ShapeError(f"{where}: the cached predictions have {len(self.source)} rows; expected one per training "
                                 f"sample ({len(x)})")
            return self._checked(self.source.detach().float().cpu(), where), None
        module = self.source
        was_training = module.training
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        module.eval()
        outs: list[Tensor] = []
        feats: list[Tensor] = []
        try:
            for start in range(0, len(x), batch_size):
                chunk = x[start:start + batch_size].to(device)
                if isinstance(module, MultiTaskModel):
                    z = module.encode(chunk, source)
                    outs.append(module.decode(z, [self.task.name])[self.task.name].float().cpu())
                    if features:
                        feats.append(z.reshape(len(z), -1).float().cpu())
                else:
                    if features:
                        raise InvalidParameterError(f"{where} is a plain nn.Module, whose representation polytask cannot "
                                                    "find; feature distillation needs a polytask model as teacher")
                    outs.append(self._checked(module(chunk).float().cpu(), where))
        finally:
            module.train(was_training)
        return self._checked(torch.cat(outs), where), (torch.cat(feats) if features else None)

    def _checked(self, output: Tensor, where: str) -> Tensor:
        task = self.task
        expected = task.out_features
        if output.dim() == 2 and output.shape[1] == expected and expected == 1:
            output = output.squeeze(1)
        want = "(N,)" if expected == 1 and task.kind in ("regression", "binary") else f"(N, {expected})"
        ok = output.dim() == 1 if want == "(N,)" else (output.dim() == 2 and output.shape[1] == expected)
        if not ok:
            raise ShapeError(f"{where} gives outputs of shape {tuple(output.shape)}; the student's {task.kind} task "
                             f"'{task.name}' expects {want}{f' ({expected} classes)' if expected > 1 else ''}")
        if not torch.isfinite(output).all():
            raise DataError(f"{where} gives non-finite outputs (first at row "
                            f"{int((~torch.isfinite(output.reshape(len(output), -1))).any(1).nonzero()[0])}); expected finite values")
        return output


def check_compatible(student: Task, teacher: Task, where: str) -> None:
    """Refuse a teacher task that does not predict what the student's task predicts."""
    if teacher.kind != student.kind or teacher.num_classes != student.num_classes:
        def said(t: Task) -> str:
            return t.kind + (f" with {t.num_classes} classes" if t.num_classes else "")
        raise ConfigError(f"task '{student.name}': {where} is {said(teacher)}; expected {said(student)} like the student's task")
    if student.kind == "regression" and teacher.target_scaling != student.target_scaling:
        raise ConfigError(f"task '{student.name}': {where} learned targets standardised as (mean, std) = "
                          f"{teacher.target_scaling}; the student's are {student.target_scaling}, so its predictions are "
                          "in other units: expected teachers trained on the same training rows and standardisation")


def as_teacher(task: Task, source: Any, *, checkpoint: str = "best") -> Teacher:
    """A :class:`Teacher` for the student's ``task`` from a run directory, a model, a module or predictions."""
    name = ""
    if isinstance(source, (str, Path)):
        from polytask.runs import load

        name = str(source)
        run = load(source, checkpoint)
        source = run.model
    if isinstance(source, MultiTaskModel):
        names = list(source.task_names)
        teacher_name = task.name if task.name in names else names[0] if len(names) == 1 else None
        if teacher_name is None:
            raise ConfigError(f"task '{task.name}': the teacher model{f' {name}' if name else ''} has tasks {names} but not "
                              f"'{task.name}'.{closest(task.name, names)} Expected a single-task teacher or one with that task")
        check_compatible(task, source.tasks[teacher_name], f"the teacher{f' {name}' if name else ''} (task '{teacher_name}')")
        if teacher_name != task.name:
            source = _Renamed(source, teacher_name, task)
        return Teacher(task, source, name)
    if isinstance(source, (nn.Module, Tensor)):
        return Teacher(task, source, name)
    raise InvalidParameterError(f"teacher of task '{task.name}' must be a run directory, a polytask model, an nn.Module or a "
                                f"tensor of predictions; found {type(source).__name__}")


class _Renamed(MultiTaskModel):
    """A one-task teacher whose task has another name than the student's."""

    def __init__(self, model: MultiTaskModel, name: str, task: Task) -> None:
        nn.Module.__init__(self)
        self.inner, self.inner_name = model, name
        self.task_names = (task.name,)  # type: ignore[misc]

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        return self.inner.encode(x, self.inner_name if task is not None else None)

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return {self.task_names[0]: self.inner.decode(z, [self.inner_name])[self.inner_name]}


def build_teachers(tasks: Sequence[Task], sources: Mapping[str, Any], *, checkpoint: str = "best") -> dict[str, Teacher]:
    """Teachers of the student's tasks from ``{task: source}``; unknown task names are refused."""
    by_name = {t.name: t for t in tasks}
    for name in sources:
        if name not in by_name:
            raise ConfigError(f"a teacher is given for task '{name}', which the student does not have."
                              f"{closest(name, by_name)} Student tasks: {', '.join(by_name)}")
    return {name: as_teacher(by_name[name], source, checkpoint=checkpoint) for name, source in sources.items()}


def _rows_of(data: Data, task: str) -> MultiOutputDataset:
    if isinstance(data, TaskDatasets):
        if task not in data.datasets:
            raise DataError(f"task '{task}' has a teacher but no training data set; expected one of {', '.join(data.datasets)}")
        return data.datasets[task]
    return data


@dataclass
class TeacherOutputs:
    """Each teacher's outputs (and representations) on the training rows, with the cache keys."""

    outputs: dict[str, Tensor]
    features: dict[str, Tensor]
    data: dict[str, str]
    teachers: dict[str, str]

    def save(self, path: str | Path) -> Path:
        """Write atomically (a temporary file renamed over ``path``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": FORMAT, "outputs": self.outputs, "features": self.features, "data": self.data,
                    "teachers": self.teachers}, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> TeacherOutputs:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"teacher cache {path} does not exist; expected a file written by TeacherOutputs.save "
                            "(polytask teachers CONFIG)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for truncated or foreign files
            raise DataError(f"teacher cache {path} cannot be read ({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}); "
                            "expected a file written by polytask: delete it to rebuild it") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            found = state.get("format") if isinstance(state, dict) else None
            raise DataError(f"{path} is not a polytask teacher cache (format {found!r}); expected {FORMAT!r}: "
                            "delete it to rebuild it")
        return cls(dict(state["outputs"]), dict(state["features"]), dict(state["data"]), dict(state["teachers"]))

    def check(self, teachers: Mapping[str, Teacher], data: Data, *, features: bool = False, where: str = "teacher cache") -> None:
        """Refuse outputs computed on other rows or by other teachers, naming the task."""
        for name, teacher in teachers.items():
            if name not in self.outputs:
                raise DataError(f"{where} has no outputs for task '{name}' (it holds {', '.join(self.outputs) or 'none'}); "
                                "expected one per teacher: rebuild it")
            rows = _rows_of(data, name)
            if self.data.get(name) != fingerprint(rows):
                raise DataError(f"{where} for task '{name}' was built from other data (inputs fingerprint "
                                f"{str(self.data.get(name))[:12]}…, these training rows {fingerprint(rows)[:12]}…); expected a "
                                "cache of these rows: delete it or rebuild it (polytask teachers CONFIG --refresh)")
            if self.teachers.get(name) != teacher.key:
                raise DataError(f"{where} for task '{name}' is stale: it was built by another teacher (hash "
                                f"{str(self.teachers.get(name))[:12]}…, this teacher {teacher.key[:12]}…); expected the outputs of "
                                "this teacher: delete it or rebuild it (polytask teachers CONFIG --refresh)")
            if len(self.outputs[name]) != len(rows):
                raise DataError(f"{where} for task '{name}' has {len(self.outputs[name])} rows; expected {len(rows)}")
            if features and name not in self.features:
                raise DataError(f"{where} has no teacher representation for task '{name}'; feature distillation needs "
                                "one: rebuild it with features")


def compute_outputs(teachers: Mapping[str, Teacher], data: Data, *, features: bool = False,
                    batch_size: int = 1024) -> TeacherOutputs:
    """Run every teacher once over the training rows it teaches."""
    outputs, feats, keys = {}, {}, {}
    for name, teacher in teachers.items():
        rows = _rows_of(data, name)
        outputs[name], f = teacher.run(rows.x, batch_size=batch_size, features=features,
                                       source=name if isinstance(data, TaskDatasets) else None)
        if f is not None:
            feats[name] = f
        keys[name] = fingerprint(rows)
    return TeacherOutputs(outputs, feats, keys, {n: t.key for n, t in teachers.items()})


def cached_outputs(teachers: Mapping[str, Teacher], data: Data, cache: str | Path | None = None, *,
                   features: bool = False, refresh: bool = False, batch_size: int = 1024) -> TeacherOutputs:
    """The teachers' outputs from ``cache`` when it matches the data and teachers, else computed.

    No cache file yet (or ``refresh``): computed and written there. A cache that does not match
    is refused (DataError naming the task), never used: ``refresh=True`` rebuilds it. A matching
    cache without the representations that ``features`` asks for is rebuilt with them.
    """
    if cache is not None and Path(cache).exists() and not refresh:
        found = TeacherOutputs.load(cache)
        found.check(teachers, data, where=f"teacher cache {cache}")
        if not features or all(name in found.features for name in teachers):
            return found
        # these rows and teachers, without the representations now asked for: rebuilt with them
    computed = compute_outputs(teachers, data, features=features, batch_size=batch_size)
    if cache is not None:
        computed.save(cache)
    return computed


def attach(data: Data, outputs: TeacherOutputs, teachers: Mapping[str, Teacher] | None = None) -> Data:
    """The training data with the teachers' outputs as extra per-row targets (a new object; ``data``
    is not changed). With ``teachers``, the cache keys are checked first."""
    if teachers is not None:
        outputs.check(teachers, data, features=bool(outputs.features))

    def extended(ds: MultiOutputDataset, names: Sequence[str]) -> MultiOutputDataset:
        extra: dict[str, Tensor] = {}
        for name in names:
            if len(outputs.outputs[name]) != len(ds):
                raise DataError(f"teacher outputs of task '{name}' have {len(outputs.outputs[name])} rows; the training "
                                f"data have {len(ds)}")
            extra[teacher_key(name)] = outputs.outputs[name]
            if name in outputs.features:
                extra[feature_key(name)] = outputs.features[name]
        return MultiOutputDataset(ds.x, {**ds.targets, **extra}, ds.masks)

    if isinstance(data, TaskDatasets):
        return TaskDatasets({t: extended(ds, [t] if t in outputs.outputs else []) for t, ds in data.datasets.items()})
    return extended(data, list(outputs.outputs))
