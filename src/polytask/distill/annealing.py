"""Teacher annealing: the weight λ of the true label in the target λ·y + (1 − λ)·teacher.

Clark, Luong, Khandelwal, Manning & Le (2019), "BAM! Born-Again Multi-Task Networks for Natural
Language Understanding", ACL: the student's target for task t is λ·yₜ + (1 − λ)·fₜ(x), the
teacher's prediction mixed with the gold label, with λ rising linearly from 0 to 1 over training,
so that the student starts by imitating its teacher and ends learning from the labels alone.

A schedule maps training progress p ∈ [0, 1] (the step index over the run's total steps) to λ.
``constant`` is the non-annealed mixture (a fixed λ; λ = 0 is pure distillation, λ = 1 plain
supervised training). Every schedule accepts ``start`` and ``end`` (λ at p = 0 and p = 1).

Departures: BAM's schedule is ``linear``; ``cosine``, ``exponential`` and ``step`` are the
usual alternatives, offered as options, not from the paper.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any

from polytask.core.errors import InvalidParameterError
from polytask.core.registry import Registry


def _fraction(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InvalidParameterError(f"`{name}` of annealing schedule '{owner}' must be a number in [0, 1]; found {value!r}")
    return float(value)


class Schedule(ABC):
    """λ(p) for training progress p ∈ [0, 1]; subclasses define ``shape(p)`` rising from 0 to 1."""

    name = "schedule"

    def __init__(self, *, start: float = 0.0, end: float = 1.0) -> None:
        self.start, self.end = _fraction(self.name, "start", start), _fraction(self.name, "end", end)

    @abstractmethod
    def shape(self, progress: float) -> float:
        """The schedule's rise from 0 (progress 0) to 1 (progress 1)."""

    def __call__(self, progress: float) -> float:
        p = min(1.0, max(0.0, float(progress)))
        return self.start + (self.end - self.start) * self.shape(p)

    def __repr__(self) -> str:
        return f"{self.name}(start={self.start:g}, end={self.end:g})"


ANNEALING: Registry[Schedule] = Registry("annealing schedule")


@ANNEALING.register("linear")
class Linear(Schedule):
    """λ = start + (end − start)·p: BAM's teacher annealing (Clark et al., ACL 2019)."""

    name = "linear"

    def shape(self, progress: float) -> float:
        return progress


@ANNEALING.register("cosine")
class Cosine(Schedule):
    """λ rises along a half cosine, ½(1 − cos πp): slow at both ends."""

    name = "cosine"

    def shape(self, progress: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * progress))


@ANNEALING.register("exponential")
class Exponential(Schedule):
    """λ rises as (e^{rate·p} − 1)/(e^{rate} − 1): the teacher keeps most weight until late (rate > 0)."""

    name = "exponential"

    def __init__(self, *, start: float = 0.0, end: float = 1.0, rate: float = 5.0) -> None:
        super().__init__(start=start, end=end)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
            raise InvalidParameterError(f"`rate` of annealing schedule 'exponential' must be a number > 0; found {rate!r}")
        self.rate = float(rate)

    def shape(self, progress: float) -> float:
        return math.expm1(self.rate * progress) / math.expm1(self.rate)


@ANNEALING.register("step")
class Step(Schedule):
    """λ = start before progress ``at``, end from there on."""

    name = "step"

    def __init__(self, *, start: float = 0.0, end: float = 1.0, at: float = 0.5) -> None:
        super().__init__(start=start, end=end)
        self.at = _fraction(self.name, "at", at)

    def shape(self, progress: float) -> float:
        return 1.0 if progress >= self.at else 0.0


@ANNEALING.register("constant")
class Constant(Schedule):
    """A fixed mixture λ = ``value`` throughout (no annealing; 0: distillation only, 1: labels only)."""

    name = "constant"

    def __init__(self, *, value: float = 0.5) -> None:
        self.value = _fraction(self.name, "value", value)
        super().__init__(start=self.value, end=self.value)

    def shape(self, progress: float) -> float:
        return 0.0

    def __repr__(self) -> str:
        return f"constant(value={self.value:g})"


def build_schedule(spec: str | Mapping[str, Any] | Schedule | float | None) -> Schedule:
    """A schedule from a name, ``{name: NAME, **params}``, a Schedule, or a number (a constant λ)."""
    if spec is None:
        return Linear()
    if isinstance(spec, Schedule):
        return spec
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return Constant(value=spec)
    if isinstance(spec, str):
        return ANNEALING.create(spec)
    if isinstance(spec, Mapping) and isinstance(spec.get("name"), str):
        return ANNEALING.create(spec["name"], **{k: v for k, v in spec.items() if k != "name"})
    raise InvalidParameterError(f"`anneal` must be a schedule name ({', '.join(ANNEALING.names())}), "
                                f"{{name: NAME, **params}} or a number λ in [0, 1]; found {spec!r}")
