"""Per-task losses: the ``LOSSES`` registry of named losses and :class:`TaskLoss`, what a Task calls.

A task's loss is given as

- nothing: the kind's default, ``mse`` (regression), ``bce`` (binary, multilabel) or ``ce`` (multiclass);
- a registered name, ``"huber"``, or a name with parameters, ``{"name": "focal", "gamma": 2.0}``
  (the form a YAML file uses: ``loss: {name: focal, gamma: 2.0}``);
- any callable ``(prediction, target) -> scalar tensor`` (a function, an ``nn.Module`` instance such
  as ``nn.SmoothL1Loss()``: its own parameters, if any, are not trained).

Whatever the form, the loss receives only the labelled samples of the batch (masked rows are
removed first) and never an empty batch; the shapes and dtypes it receives, per kind:

============  ===============================  ===================================
kind          prediction                       target
============  ===============================  ===================================
regression    ``(N,)`` float values            ``(N,)`` float32
binary        ``(N,)`` float logits            ``(N,)`` float32, 0 or 1
multiclass    ``(N, C)`` float logits          ``(N,)`` int64 class indices in [0, C)
multilabel    ``(N, C)`` float logits          ``(N, C)`` float32, 0 or 1
============  ===============================  ===================================

Predictions in float16/bfloat16 (mixed precision) are cast to float32 first. The value must be a
0-dim floating tensor that depends on the prediction (so gradients flow); a callable loss is checked
for that, and for a finite value, on its first calls, with an error naming the task.

New named losses (usable from YAML once registered, before the tasks are built)::

    @register_loss("log_cosh", kinds=("regression",))
    def log_cosh(scale: float = 1.0):
        "log(cosh(scale·error)) / scale²."
        return lambda prediction, target: (torch.log(torch.cosh(scale * (prediction - target))) / scale**2).mean()

A factory takes the loss's parameters as keywords and returns the ``(prediction, target)`` function;
it may also declare ``kind``, ``num_classes`` and ``task`` (the task's name), which are filled in.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from polytask.core.errors import InvalidParameterError, ShapeError, closest

LossFunction = Callable[[Tensor, Tensor], Tensor]
LossSpec = str | Mapping[str, Any] | LossFunction | None
"""What ``Task(loss=...)`` accepts (besides a :class:`TaskLoss`)."""

CONTEXT = ("kind", "num_classes", "task")
"""Factory parameters filled from the task rather than from the loss's own parameters."""

_HALF = (torch.float16, torch.bfloat16)

#: the package that registers the losses of the vision kinds (segmentation, dense_regression,
#: detection); it imports core, so core loads it by name when those losses are first needed
VISION_LOSSES = "polytask.vision"
#: the same for the text kind (generation)
TEXT_LOSSES = "polytask.text"


def _load_vision_losses() -> None:
    importlib.import_module(VISION_LOSSES)
    importlib.import_module(TEXT_LOSSES)


@dataclass(frozen=True)
class LossEntry:
    name: str
    factory: Callable[..., LossFunction]
    kinds: tuple[str, ...]


class LossRegistry:
    """Named loss factories, each valid for some task kinds (``polytask list``-compatible)."""

    kind = "loss"

    def __init__(self) -> None:
        self._entries: dict[str, LossEntry] = {}
        self.defaults: dict[str, str] = {}

    # ------------------------------------------------------------------------------- entries
    def register(self, name: str, *, kinds: tuple[str, ...] | list[str], default_for: tuple[str, ...] = (),
                 overwrite: bool = False) -> Callable[[Callable[..., LossFunction]], Callable[..., LossFunction]]:
        """Decorator: register a factory under ``name`` for the task ``kinds`` it fits."""
        from polytask.core.task import KINDS  # task.py imports this module: imported when called

        if not isinstance(name, str) or not name.isidentifier():
            raise InvalidParameterError(f"a loss name must be identifier-like (letters, digits, '_'); found {name!r}")
        kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        for k in kinds:
            if k not in KINDS:
                raise InvalidParameterError(f"`kinds` of loss '{name}': {k!r} is not a task kind.{closest(str(k), KINDS)} "
                                            f"Kinds: {', '.join(KINDS)}")
        if not kinds:
            raise InvalidParameterError(f"`kinds` of loss '{name}' must name at least one task kind ({', '.join(KINDS)})")
        if name in self._entries and not overwrite:
            raise InvalidParameterError(f"loss '{name}' is registered already; pass overwrite=True to replace it")

        def decorate(factory: Callable[..., LossFunction]) -> Callable[..., LossFunction]:
            if not callable(factory):
                raise InvalidParameterError(f"loss '{name}': the factory must be callable; found {type(factory).__name__}")
            self._add(LossEntry(name, factory, kinds), default_for)
            return factory

        return decorate

    def _add(self, entry: LossEntry, default_for: tuple[str, ...] = ()) -> None:
        self._entries[entry.name] = entry
        for kind in default_for:
            self.defaults[kind] = entry.name

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def names(self) -> list[str]:
        _load_vision_losses()
        return sorted(self._entries)

    def entry(self, name: str) -> LossEntry:
        if name not in self._entries:
            _load_vision_losses()
        if name not in self._entries:
            raise InvalidParameterError(f"unknown loss '{name}'.{closest(name, self._entries)} Valid losses: "
                                        f"{', '.join(self.names())} (or register one with polytask.core.register_loss)")
        return self._entries[name]

    def get(self, name: str) -> Callable[..., LossFunction]:
        return self.entry(name).factory

    def kinds(self, name: str) -> tuple[str, ...]:
        return self.entry(name).kinds

    def for_kind(self, kind: str) -> list[str]:
        return [n for n, e in sorted(self._entries.items()) if kind in e.kinds]

    def parameters(self, name: str) -> dict[str, inspect.Parameter]:
        """The loss's own keyword parameters (not the ones filled from the task)."""
        sig = inspect.signature(self.get(name))
        return {p.name: p for p in sig.parameters.values()
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in CONTEXT}

    def describe(self, name: str) -> str:
        doc = inspect.getdoc(self.get(name)) or ""
        return doc.splitlines()[0] if doc else ""

    def check_params(self, name: str, params: Mapping[str, Any], task: str | None = None) -> None:
        """Unknown or missing parameters of ``name`` (for early checks of a config)."""
        of = f"loss '{name}'" + (f" of task '{task}'" if task else "")
        accepted = self.parameters(name)
        for key in params:
            if key not in accepted:
                raise InvalidParameterError(f"{of} has no parameter '{key}'.{closest(str(key), accepted)} Valid parameters: "
                                            f"{', '.join(sorted(accepted)) or 'none'}")
        missing = [k for k, p in accepted.items() if p.default is p.empty and k not in params]
        if missing:
            raise InvalidParameterError(f"{of} requires parameter(s) {', '.join(missing)}")

    # ----------------------------------------------------------------------------- resolving
    def split(self, spec: Any, task: str) -> tuple[str, dict[str, Any]]:
        """``"name"`` or ``{"name": ..., **params}`` as (name, params)."""
        if isinstance(spec, str):
            return spec, {}
        if isinstance(spec, Mapping):
            if "name" not in spec or not isinstance(spec["name"], str):
                raise InvalidParameterError(
                    f"`loss` of task '{task}' given as a mapping needs a `name`, e.g. {{name: focal, gamma: 2.0}}; "
                    f"found keys {', '.join(map(str, spec)) or 'none'}")
            return spec["name"], {k: v for k, v in spec.items() if k != "name"}
        raise InvalidParameterError(f"`loss` of task '{task}' must be a loss name, a mapping {{name: ..., parameters}} or a "
                                    f"callable (prediction, target) -> scalar; found {type(spec).__name__}")

    def resolve(self, spec: Any, *, task: str, kind: str, num_classes: int | None) -> TaskLoss:
        """The :class:`TaskLoss` a task of this kind calls, parameters validated."""
        if isinstance(spec, TaskLoss):
            spec = spec.spec
        if kind not in self.defaults:
            _load_vision_losses()
        if spec is None:
            spec = self.defaults[kind]
        if isinstance(spec, type):
            raise InvalidParameterError(f"`loss` of task '{task}' is the class {spec.__name__}; give an instance "
                                        f"({spec.__name__}()) or a function (prediction, target) -> scalar")
        if callable(spec) and not isinstance(spec, (str, Mapping)):
            return TaskLoss(spec, task, kind, num_classes, spec, None, {})
        name, params = self.split(spec, task)
        entry = self.entry(name)
        if kind not in entry.kinds:
            raise InvalidParameterError(f"loss '{name}' does not apply to {kind} task '{task}'; losses for {kind}: "
                                        f"{', '.join(self.for_kind(kind))}")
        self.check_params(name, params, task)
        context = {"kind": kind, "num_classes": num_classes, "task": task}
        declared = inspect.signature(entry.factory).parameters
        function = entry.factory(**{k: v for k, v in context.items() if k in declared}, **params)
        return TaskLoss(spec, task, kind, num_classes, function, name, params)


class TaskLoss:
    """A task's loss, called as ``loss(prediction, target, mask=None)``: the mean over labelled samples,
    or ``None`` when the batch has none. ``name`` and ``params`` say which registered loss it is
    (``name`` is None for a callable); :meth:`to_config` writes it back as a config value."""

    def __init__(self, spec: Any, task: str, kind: str, num_classes: int | None, function: LossFunction,
                 name: str | None, params: dict[str, Any]) -> None:
        self.spec, self.task, self.kind, self.num_classes = spec, task, kind, num_classes
        self.function, self.name, self.params = function, name, dict(params)
        self.custom = name is None
        self._grad_checked = not self.custom

    def __call__(self, prediction: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor | None:
        if mask is not None:
            if not bool(mask.any()):
                return None
            if not bool(mask.all()):
                prediction, target = prediction[mask], target[mask]
        if prediction.dtype in _HALF:
            prediction = prediction.float()
        if target.is_floating_point() and target.dtype != prediction.dtype:
            # float32 targets of a float64 model: CUDA's loss backward kernels refuse mixed dtypes
            # (CPU's promote), so the targets take the prediction's dtype, as they would on the CPU
            target = target.to(prediction.dtype)
        value = self.function(prediction, target)
        if not self._grad_checked:
            self._check(value, prediction, target)
        return value

    def _check(self, value: Any, prediction: Tensor, target: Tensor) -> None:
        """A callable's first values: a finite 0-dim float tensor, with a gradient when one is being taken."""
        what = f"loss {self.describe()} of task '{self.task}'"
        if not isinstance(value, Tensor):
            raise InvalidParameterError(f"{what} returned {type(value).__name__}; expected a 0-dim tensor computed from the "
                                        "prediction (do not call .item() or float() on it)")
        if value.dim() != 0:
            raise ShapeError(f"{what} returned shape {tuple(value.shape)} for a batch of {len(prediction)}; expected a scalar "
                             "(0-dim) tensor: reduce it, e.g. with .mean()")
        if not value.is_floating_point():
            raise InvalidParameterError(f"{what} returned dtype {value.dtype}; expected a floating-point scalar")
        inputs_finite = bool(torch.isfinite(prediction).all()) and (
            not target.is_floating_point() or bool(torch.isfinite(target).all()))
        if inputs_finite and not bool(torch.isfinite(value)):
            raise InvalidParameterError(f"{what} returned {float(value.detach())} for finite predictions and targets; expected a "
                                        "finite value")
        if torch.is_grad_enabled() and prediction.requires_grad:
            if not value.requires_grad:
                raise InvalidParameterError(f"{what} does not depend on the prediction (no gradient reaches the model); "
                                            "compute it with torch operations on `prediction`")
            self._grad_checked = True

    def describe(self) -> str:
        if self.name is not None:
            return f"'{self.name}'"
        return f"'{getattr(self.function, '__qualname__', type(self.function).__name__)}'"

    def to_config(self) -> str | dict[str, Any] | None:
        """The config value that rebuilds this loss: ``None`` for the kind's default without parameters
        (nothing to write) and for a callable (it has no name to write)."""
        if self.name is None or (self.name == LOSSES.defaults.get(self.kind) and not self.params):
            return None
        if not self.params:
            return self.name
        return {"name": self.name, **{k: _plain(v) for k, v in self.params.items()}}

    def _key(self) -> tuple[Any, ...]:
        if self.name is None:
            return (None, id(self.function))
        return (self.name, tuple(sorted((k, _freeze(v)) for k, v in self.params.items())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TaskLoss):
            return NotImplemented
        if self.custom or other.custom:
            return self.function is other.function
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        if self.name is None:
            return f"TaskLoss({self.function!r})"
        params = "".join(f", {k}={v!r}" for k, v in self.params.items())
        return f"TaskLoss({self.name!r}{params})"

    def __reduce__(self) -> tuple[Any, ...]:  # pickles and copies rebuild from the spec (closures do not pickle)
        return (_rebuild, (self.spec, self.task, self.kind, self.num_classes))


def _rebuild(spec: Any, task: str, kind: str, num_classes: int | None) -> TaskLoss:
    return LOSSES.resolve(spec, task=task, kind=kind, num_classes=num_classes)


def _freeze(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def _plain(value: Any) -> Any:
    """Tensors, arrays and tuples as lists of Python numbers (what YAML and JSON write)."""
    if isinstance(value, Tensor) or hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


LOSSES = LossRegistry()


def register_loss(name: str, *, kinds: tuple[str, ...] | list[str] | str, overwrite: bool = False
                  ) -> Callable[[Callable[..., LossFunction]], Callable[..., LossFunction]]:
    """Register a loss factory under ``name`` for the task ``kinds`` it fits (see the module docstring)."""
    return LOSSES.register(name, kinds=kinds, overwrite=overwrite)


# -------------------------------------------------------------------------- parameter checks
def _number(value: Any, what: str, *, low: float = 0.0, high: float | None = None, low_open: bool = False,
            high_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidParameterError(f"{what} must be a finite number; found {value!r}")
    bad = value < low or (low_open and value == low) or (high is not None and (value > high or (high_open and value == high)))
    if bad:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise InvalidParameterError(f"{what} must lie in {left}{low:g}, {'inf' if high is None else f'{high:g}'}{right}; "
                                    f"found {value!r}")
    return float(value)


def _vector(value: Any, n: int | None, what: str, *, high: float | None = None, positive: bool = False) -> list[float]:
    """One number per class: finite, >= 0 (> 0 with ``positive``), <= ``high``, not all zero, ``n`` of them."""
    values = _plain(value)
    if not isinstance(values, list) or any(isinstance(v, list) for v in values):
        raise InvalidParameterError(f"{what} must be a list of numbers (one per class); found {value!r}")
    if n is not None and len(values) != n:
        raise InvalidParameterError(f"{what} must list one weight per class ({n}); found {len(values)}")
    out = [_number(v, f"{what}[{i}]", high=high, low_open=positive) for i, v in enumerate(values)]
    if not any(out):
        raise InvalidParameterError(f"{what} are all zero; expected at least one positive weight")
    return out


class _Constant:
    """A small weight tensor, copied once per (device, dtype) it is used with."""

    def __init__(self, values: float | list[float]) -> None:
        self.cpu = torch.tensor(values, dtype=torch.float64)  # cast to the prediction's dtype when used
        self._copies: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def like(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        copy = self._copies.get(key)
        if copy is None:
            copy = self._copies[key] = self.cpu.to(device=x.device, dtype=x.dtype)
        return copy


# ----------------------------------------------------------------------------------- losses
def _register(name: str, kinds: tuple[str, ...], default_for: tuple[str, ...] = ()):
    def decorate(factory: Callable[..., LossFunction]) -> Callable[..., LossFunction]:
        LOSSES._add(LossEntry(name, factory, kinds), default_for)
        return factory
    return decorate


@_register("mse", ("regression",), default_for=("regression",))
def mse() -> LossFunction:
    """Mean squared error (the regression default): mean((prediction − target)²)."""
    return F.mse_loss


@_register("l1", ("regression",))
def l1() -> LossFunction:
    """Mean absolute error: mean(|prediction − target|)."""
    return F.l1_loss


@_register("huber", ("regression",))
def huber(task: str, delta: float = 1.0) -> LossFunction:
    """Huber loss (torch.nn.functional.huber_loss): quadratic for |error| ≤ delta, linear beyond.

    Per sample ½·e² if |e| ≤ delta else delta·(|e| − ½·delta); ``delta`` > 0 (default 1.0)."""
    d = _number(delta, f"`delta` of loss 'huber' of task '{task}'", low_open=True)
    return lambda prediction, target: F.huber_loss(prediction, target, delta=d)


@_register("bce", ("binary", "multilabel"), default_for=("binary", "multilabel"))
def bce(kind: str, num_classes: int | None, task: str, pos_weight: float | list[float] | None = None) -> LossFunction:
    """Binary cross-entropy on logits (the binary and multilabel default), mean over samples (and labels).

    ``pos_weight`` (torch's): weight of the positive term, e.g. n_negative / n_positive for rare
    positives; one number (binary) or one number or one per label (multilabel); > 0."""
    if pos_weight is None:
        return F.binary_cross_entropy_with_logits
    what = f"`pos_weight` of loss 'bce' of task '{task}'"
    if kind == "multilabel" and isinstance(_plain(pos_weight), list):
        weight = _Constant(_vector(pos_weight, num_classes, what, positive=True))
    else:
        weight = _Constant(_number(pos_weight, what, low_open=True))
    return lambda prediction, target: F.binary_cross_entropy_with_logits(prediction, target, pos_weight=weight.like(prediction))


@_register("ce", ("multiclass",), default_for=("multiclass",))
def ce(num_classes: int, task: str, class_weights: list[float] | None = None, label_smoothing: float = 0.0) -> LossFunction:
    """Cross-entropy over the class logits (the multiclass default), torch.nn.functional.cross_entropy.

    ``class_weights``: one weight ≥ 0 per class; the mean is then Σ wᵧ·lossᵢ / Σ wᵧ (torch's weighted
    mean). ``label_smoothing`` in [0, 1): the target puts 1 − ε on its class and ε/C on every class."""
    smoothing = _number(label_smoothing, f"`label_smoothing` of loss 'ce' of task '{task}'", high=1.0, high_open=True)
    weight = None if class_weights is None else _Constant(
        _vector(class_weights, num_classes, f"`class_weights` of loss 'ce' of task '{task}'"))

    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(prediction, target, weight=None if weight is None else weight.like(prediction),
                               label_smoothing=smoothing)
    return loss


@_register("focal", ("binary", "multilabel", "multiclass"))
def focal(kind: str, num_classes: int | None, task: str, gamma: float = 2.0,
          alpha: float | list[float] | None = None) -> LossFunction:
    """Focal loss (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017): −α_t·(1 − p_t)^γ·log p_t.

    p_t is the probability given to the true label (sigmoid for binary/multilabel, softmax for
    multiclass); ``gamma`` ≥ 0 down-weights easy samples (γ = 0 is cross-entropy; the paper uses 2).
    ``alpha``: binary/multilabel, the weight α ∈ [0, 1] of positives (negatives get 1 − α; the paper
    and torchvision use 0.25), or one per label for multilabel; multiclass, one weight ≥ 0 per class
    (α_t = alpha[target]). Default: no α weighting. Mean over samples (and labels)."""
    where = f"of loss 'focal' of task '{task}'"
    g = _number(gamma, f"`gamma` {where}")
    weights: _Constant | None = None
    if alpha is not None:
        if kind == "multiclass":
            weights = _Constant(_vector(alpha, num_classes, f"`alpha` {where} (one weight per class for a multiclass task)"))
        elif kind == "multilabel" and isinstance(_plain(alpha), list):
            weights = _Constant(_vector(alpha, num_classes, f"`alpha` {where}", high=1.0))
        else:
            weights = _Constant(_number(alpha, f"`alpha` {where}", high=1.0))

    def modulated(log_pt: Tensor) -> Tensor:  # −(1 − p_t)^γ · log p_t
        if g == 0:
            return -log_pt
        return -((1 - log_pt.exp()).clamp(min=0) ** g) * log_pt

    def binary(prediction: Tensor, target: Tensor) -> Tensor:
        log_pt = -F.binary_cross_entropy_with_logits(prediction, target, reduction="none")  # log p_t, stable
        loss = modulated(log_pt)
        if weights is not None:
            a = weights.like(prediction)
            loss = (a * target + (1 - a) * (1 - target)) * loss
        return loss.mean()

    def multiclass(prediction: Tensor, target: Tensor) -> Tensor:
        log_pt = F.log_softmax(prediction, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
        loss = modulated(log_pt)
        if weights is not None:
            loss = weights.like(log_pt)[target] * loss
        return loss.mean()

    return multiclass if kind == "multiclass" else binary
