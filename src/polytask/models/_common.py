"""Helpers shared by the architectures: encoder factories, per-task heads, stacked representations."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.core.task import Task
from polytask.models.heads import make_head

EncoderFactory = Callable[[], nn.Module]


def make_encoder(factory: EncoderFactory, architecture: str, what: str = "encoder") -> tuple[nn.Module, int]:
    """Call ``factory`` for a fresh module and read its output width (``out_features``)."""
    if not callable(factory) or isinstance(factory, nn.Module):
        raise InvalidParameterError(
            f"`encoder_factory` of `{architecture}` must be a callable returning a new nn.Module for every call "
            f"(e.g. lambda: MLP(in_features=8)); found {type(factory).__name__}")
    module = factory()
    if not isinstance(module, nn.Module):
        raise InvalidParameterError(f"`encoder_factory` of `{architecture}` returned {type(module).__name__}; expected an nn.Module")
    width = getattr(module, "out_features", None)
    if not isinstance(width, int) or width < 1:
        raise InvalidParameterError(
            f"the {what} made by `encoder_factory` of `{architecture}` ({type(module).__name__}) needs an int "
            "`out_features` attribute (its output width)")
    return module, width


def encoder_width(encoder: nn.Module, architecture: str, representation_dim: int | None = None) -> int:
    if not isinstance(encoder, nn.Module):
        raise InvalidParameterError(f"`encoder` of `{architecture}` must be an nn.Module; found {type(encoder).__name__}")
    dim = representation_dim if representation_dim is not None else getattr(encoder, "out_features", None)
    if not isinstance(dim, int) or dim < 1:
        raise InvalidParameterError(
            f"cannot tell the width of {type(encoder).__name__}'s output: give the encoder an `out_features` "
            "attribute or pass `representation_dim`")
    return dim


def positive_int(value: object, name: str, architecture: str, low: int = 1) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise InvalidParameterError(f"`{name}` of `{architecture}` must be an int >= {low}; found {value!r}")
    return value


def task_heads(tasks: Sequence[Task], dim: int, hidden: Sequence[int], dropout: float, *, feature_map: Any = None) -> nn.ModuleDict:
    """One head per task; ``feature_map``: the encoder's (``polytask.vision.FeatureMap``), read by the heads of vision tasks."""
    return nn.ModuleDict({t.name: make_head(dim, t.out_features, hidden, dropout, task=t, feature_map=feature_map) for t in tasks})


def check_rows(z: Tensor, dim: int, who: str) -> Tensor:
    if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != dim:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ShapeError(f"{who} returned {shape}; expected (batch, {dim})")
    return z


def trainable(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    return [p for p in params if p.requires_grad]


def last_layer(module: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the last submodule of ``module`` that owns any directly."""
    owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return trainable(owners[-1].parameters(recurse=False)) if owners else []
