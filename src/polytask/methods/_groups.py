"""Column groups of the task Jacobian J by parameter tensor or by layer (GradVac's group_type, MetaBalance).

J's columns are the flattened gradients of θ's tensors in order; ``Step.param_shapes`` gives their
shapes. LibMTL's GradVac groups by the encoder's leaf modules (``all_layer``) or by parameter tensor
(``all_matrix``); the engine knows the tensors, not the modules, so a layer here is recovered from
the order and shapes: a tensor of 2 or more dimensions (a Linear or Conv weight) starts a layer and
takes the 1-D tensor that follows it when that has one entry per output (its bias); other 1-D
tensors pair up when consecutive and of equal length (a norm layer's weight and bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polytask.core.errors import InvalidParameterError

GROUP_TYPES = ("whole", "layer", "matrix")


def check_group_type(owner: str, value: object) -> str:
    if value not in GROUP_TYPES:
        raise InvalidParameterError(
            f"`group_type` of `{owner}` must be one of {', '.join(GROUP_TYPES)} (LibMTL's 0, 1, 2); found {value!r}")
    return value  # type: ignore[return-value]


def layer_of(shapes: Sequence[torch.Size]) -> list[int]:
    """The layer index of every tensor (see the module docstring)."""
    layers: list[int] = []
    start: torch.Size | None = None  # the shape of the current layer's first tensor
    members = 0
    for shape in shapes:
        joins = (start is not None and members == 1 and len(shape) == 1
                 and ((len(start) >= 2 and start[0] == shape[0]) or (len(start) == 1 and start == shape)))
        if joins:
            members += 1
        else:
            start, members = shape, 1
        layers.append(layers[-1] + (0 if joins else 1) if layers else 0)
    return layers


def column_groups(shapes: Sequence[torch.Size] | None, width: int, group_type: str) -> list[slice]:
    """Slices of J's columns, one per group; all columns are one group for ``whole`` or without shapes."""
    if group_type == "whole" or shapes is None:
        return [slice(0, width)]
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if sum(sizes) != width:
        raise InvalidParameterError(f"the step's parameter shapes cover {sum(sizes)} columns; its Jacobian has {width}")
    keys = layer_of(shapes) if group_type == "layer" else list(range(len(sizes)))
    groups: list[slice] = []
    offset = 0
    for i, n in enumerate(sizes):
        if i > 0 and keys[i] == keys[i - 1]:
            groups[-1] = slice(groups[-1].start, offset + n)
        else:
            groups.append(slice(offset, offset + n))
        offset += n
    return groups
