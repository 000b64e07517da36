"""Task heads: a linear layer or a small MLP from the shared representation to a task's outputs."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from polytask.core.errors import InvalidParameterError


def mlp_layers(in_features: int, hidden: Sequence[int], out_features: int | None, *, dropout: float = 0.0,
               activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear → activation (→ dropout) blocks, then an optional final linear layer."""
    if any(not isinstance(h, int) or h < 1 for h in hidden):
        raise InvalidParameterError(f"`hidden` sizes must be positive ints; found {list(hidden)}")
    if not 0.0 <= dropout < 1.0:
        raise InvalidParameterError(f"`dropout` must be in [0, 1); found {dropout}")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    if out_features is not None:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def make_head(in_features: int, out_features: int, hidden: Sequence[int] = (), dropout: float = 0.0) -> nn.Module:
    """A task head: linear when ``hidden`` is empty, else an MLP."""
    return mlp_layers(in_features, hidden, out_features, dropout=dropout)
