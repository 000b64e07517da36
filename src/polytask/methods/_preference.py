"""Per-task vectors given by task name (preferences, reference points) of PBI, COSMOS and UPGrad."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError

Bound = Literal["finite", "non_negative", "positive"]
_TEXT = {"finite": "finite", "non_negative": ">= 0", "positive": "> 0"}


def check_vector(owner: str, name: str, values: Mapping[str, float] | None, bound: Bound) -> dict[str, float]:
    """A mapping task → number, each value finite and within ``bound``; {} for None."""
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise InvalidParameterError(f"`{name}` of `{owner}` must map task names to numbers; found {values!r}")
    out = {}
    for task, value in values.items():
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and (bound == "finite" or value > 0 or (bound == "non_negative" and value == 0))
        if not ok:
            raise InvalidParameterError(f"`{name}['{task}']` of `{owner}` must be a number {_TEXT[bound]}; found {value!r}")
        out[str(task)] = float(value)
    return out


def vector(values: Mapping[str, float], tasks: tuple[str, ...], default: float) -> Tensor:
    """The values of ``tasks`` (``default`` for unlisted ones), float64 on the CPU."""
    return torch.tensor([values.get(t, default) for t in tasks], dtype=torch.float64)
