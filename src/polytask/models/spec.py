"""A model's recipe: how a model built from registered parts can be built again (``model.json``).

A :class:`~polytask.Trainer` run from Python has no YAML config, so ``polytask eval``/``predict``
and ``polytask.load(run_dir)`` had nothing to rebuild its model from. Every architecture and
encoder registered in ``ARCHITECTURES``/``ENCODERS`` records the arguments it was built with
(:func:`record_arguments`, applied by their registries); :func:`model_spec` turns a model built
only of such parts, plain values and :class:`~polytask.Task` s into JSON, and
:func:`build_from_spec` builds the same model (with fresh weights: the checkpoint brings them).

A model with anything else in it — a user's own encoder class, a lambda, per-task stems, a
custom loss callable — has no recipe (``model_spec`` returns ``None`` and says why in
:func:`why_no_spec`): such runs are loaded with ``polytask.load(run_dir, model=model)``.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from polytask.core.errors import ConfigError
from polytask.core.losses import TaskLoss
from polytask.core.registry import Registry
from polytask.core.task import Task

SPEC_VERSION = 1


def record_arguments(cls: type, kind: str) -> None:
    """Make instances of ``cls`` (built as exactly that class) remember their constructor arguments."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)) or "__polytask_recorded__" in cls.__dict__:
        return
    original = cls.__init__
    signature = inspect.signature(original)

    @functools.wraps(original)
    def init(self: nn.Module, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        if type(self) is cls:  # a subclass's arguments are its own business
            bound = signature.bind(self, *args, **kwargs)
            arguments = {k: v for k, v in bound.arguments.items() if k != "self"}
            object.__setattr__(self, "_polytask_recipe", (kind, cls.registry_name, arguments))  # type: ignore[attr-defined]

    cls.__init__ = init  # type: ignore[method-assign]
    cls.__polytask_recorded__ = True  # type: ignore[attr-defined]


class RecordingRegistry(Registry):
    """A registry of modules whose instances remember their constructor arguments (their recipe)."""

    def register(self, name: str) -> Any:
        decorate = super().register(name)

        def register_and_record(obj: Any) -> Any:
            obj = decorate(obj)
            record_arguments(obj, self.kind)
            return obj

        return register_and_record


class _NoSpec(Exception):
    """Internal: why a value has no JSON recipe (becomes :func:`why_no_spec`'s text)."""


def _value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _NoSpec(f"{where} is {value}")
        return value
    if isinstance(value, Task):
        return {"__task__": _task(value)}
    if isinstance(value, nn.Module):
        recipe = getattr(value, "_polytask_recipe", None)
        if recipe is None:
            raise _NoSpec(f"{where} is a {type(value).__name__}, which is not a registered polytask part")
        kind, name, arguments = recipe
        return {"__part__": kind, "name": name, "arguments": {k: _value(v, f"{where}.{k}") for k, v in arguments.items()}}
    if isinstance(value, (list, tuple)):
        return {"__tuple__": [_value(v, f"{where}[{i}]") for i, v in enumerate(value)]} if isinstance(value, tuple) else [
            _value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _value(v, f"{where}.{k}") for k, v in value.items()}}
    raise _NoSpec(f"{where} is a {type(value).__name__}")


def _task(task: Task) -> dict[str, Any]:
    loss = task.loss
    if isinstance(loss, TaskLoss):
        if loss.custom:
            raise _NoSpec(f"task '{task.name}' has a custom loss callable")
        loss = loss.spec
    try:
        json.dumps(loss)
    except TypeError:
        raise _NoSpec(f"task '{task.name}''s loss {loss!r} is not plain data") from None
    return {"name": task.name, "kind": task.kind, "num_classes": task.num_classes, "weight": task.weight,
            "metrics": list(task.metrics) if task.metrics is not None else None, "lr": task.lr,
            "weight_decay": task.weight_decay,
            "target": list(task.target) if isinstance(task.target, tuple) else task.target, "loss": loss,
            "target_scaling": list(task.target_scaling) if task.target_scaling is not None else None,
            "size": list(task.size) if task.size is not None else None}


def why_no_spec(model: nn.Module) -> str | None:
    """None when :func:`model_spec` can describe ``model``, else what stands in the way."""
    try:
        _value(model, "model")
    except _NoSpec as exc:
        return str(exc)
    return None


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """The JSON recipe of a model built from registered parts, or None (see :func:`why_no_spec`)."""
    try:
        return {"version": SPEC_VERSION, "model": _value(model, "model")}
    except _NoSpec:
        return None


def _build(value: Any) -> Any:
    if isinstance(value, list):
        return [_build(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__task__" in value:
        raw = dict(value["__task__"])
        for key in ("metrics", "target_scaling", "size"):
            if raw.get(key) is not None:
                raw[key] = tuple(raw[key])
        if isinstance(raw.get("target"), list):
            raw["target"] = tuple(raw["target"])
        return Task(**raw)
    if "__tuple__" in value:
        return tuple(_build(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _build(v) for k, v in value["__dict__"].items()}
    if "__part__" in value:
        from polytask.models import ARCHITECTURES
        from polytask.models.encoders import ENCODERS

        registries = {"architecture": ARCHITECTURES, "encoder": ENCODERS}
        if value["__part__"] not in registries:
            raise ConfigError(f"model.json names a part of kind {value['__part__']!r}; expected architecture or encoder")
        registry = registries[value["__part__"]]
        return registry.get(value["name"])(**{k: _build(v) for k, v in value["arguments"].items()})
    raise ConfigError(f"model.json holds an object polytask does not know: keys {sorted(value)}")


def build_from_spec(spec: Mapping[str, Any]) -> nn.Module:
    """The model :func:`model_spec` described, with fresh weights."""
    if not isinstance(spec, Mapping) or spec.get("version") != SPEC_VERSION or "model" not in spec:
        raise ConfigError(f"model.json is not a polytask model recipe of version {SPEC_VERSION}; found "
                          f"{dict(spec) if isinstance(spec, Mapping) else type(spec).__name__}")
    return _build(spec["model"])
