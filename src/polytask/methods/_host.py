"""A few Python floats as a new tensor, in one small torch call.

Why: a method that computes its T weights on Python floats (RLW, FAMO, DWA, the few-task
solvers of MGDA, UPGrad, CAGrad, Nash-MTL) hands them to the engine as a tensor. Inside a small
model's training step, making that tensor from a list cost 17–24 µs (``torch.tensor(list)``
parses the list; ``np.array`` and ``torch.from_numpy`` are two calls into libraries whose code
the step has pushed out of the caches), as much as all of a loss-weighting method's own
arithmetic; the tiny model's whole step is ~500 µs. Here Python's ``array`` writes the floats
and ``torch.frombuffer`` makes a tensor over that new array's memory, which the tensor alone
holds (0.97 µs against 2.05 for writing a kept array and cloning the tensor over it, the
earlier way, and 3.1 for ``torch.tensor``, in a loop of their own). The values are rounded to
the dtype as ``torch.tensor`` rounds them (a C cast from double), so the weights are the same bits.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import torch
from torch import Tensor

#: ``array`` type codes of the dtypes written this way (others take ``torch.tensor``)
_TYPECODES = {torch.float32: "f", torch.float64: "d"}


def host_tensor(values: Sequence[float], like: Tensor) -> Tensor:
    """``torch.tensor(values, dtype=like.dtype, device=like.device)``: a new tensor, the caller's own."""
    memory = _memory(values, like)
    return torch.tensor(values, dtype=like.dtype, device=like.device) if memory is None else _over(memory, like)


def host_weights(values: Sequence[float], like: Tensor) -> tuple[Tensor, list[float]]:
    """``host_tensor(values, like)`` and its values as Python floats (rounded to ``like``'s dtype):
    what a method's :meth:`~polytask.methods.base.Method.host_update` hands the engine, which then
    reads nothing back from the tensor (a ``tolist`` inside a small model's step costs 2–3 µs)."""
    memory = _memory(values, like)
    if memory is None:
        out = torch.tensor(values, dtype=like.dtype, device=like.device)
        return out, out.tolist()
    return _over(memory, like), memory.tolist()  # the array's floats are the tensor's values


def _memory(values: Sequence[float], like: Tensor) -> array | None:
    """``values`` written as ``like``'s dtype into a new array; None for a dtype without a type code."""
    code = _TYPECODES.get(like.dtype)
    return None if code is None or not values else array(code, values)


def _over(memory: array, like: Tensor) -> Tensor:
    """A tensor over ``memory`` (which it alone holds from now on), on ``like``'s device."""
    out = torch.frombuffer(memory, dtype=like.dtype)
    return out if like.is_cpu else out.to(like.device)
