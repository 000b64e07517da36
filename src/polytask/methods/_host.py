"""A few Python floats as a new tensor, at the cost of a copy.

Why: a method that computes its T weights on Python floats (RLW, FAMO, DWA, the few-task
solvers of MGDA, UPGrad, CAGrad, Nash-MTL) hands them to the engine as a tensor. Inside a small
model's training step, making that tensor from a list cost 17–24 µs (``torch.tensor(list)``
parses the list; ``np.array`` and ``torch.from_numpy`` are two calls into libraries whose code
the step has pushed out of the caches), as much as all of a loss-weighting method's own
arithmetic; the tiny model's whole step is ~350 µs. Here the floats are written by Python's
``array`` into a kept CPU tensor that shares its memory (``torch.frombuffer``) and the tensor is
cloned: one small torch call, measured at ~1 µs in that step. The values are rounded to the dtype
as ``torch.tensor`` rounds them (a C cast from double), so the weights are the same bits.
"""

from __future__ import annotations

import threading
from array import array
from collections.abc import Sequence

import torch
from torch import Tensor

#: ``array`` type codes of the dtypes written this way (others take ``torch.tensor``)
_TYPECODES = {torch.float32: "f", torch.float64: "d"}
#: per thread (a write and its clone must not interleave with another thread's write):
#: (dtype, length) → the array, the tensor over its memory and the array's type code
_LOCAL = threading.local()


def host_tensor(values: Sequence[float], like: Tensor) -> Tensor:
    """``torch.tensor(values, dtype=like.dtype, device=like.device)``: a new tensor, the caller's own."""
    kept_by_key = getattr(_LOCAL, "kept", None)
    if kept_by_key is None:
        kept_by_key = _LOCAL.kept = {}
    kept = kept_by_key.get((like.dtype, len(values)))
    if kept is None:
        code = _TYPECODES.get(like.dtype)
        if code is None or not values:
            return torch.tensor(values, dtype=like.dtype, device=like.device)
        buffer = array(code, values)
        kept = kept_by_key[(like.dtype, len(values))] = (buffer, torch.frombuffer(buffer, dtype=like.dtype), code)
    else:
        kept[0][:] = array(kept[2], values)  # the same length: written in place, never resized
    out = kept[1].clone()
    return out if like.is_cpu else out.to(like.device)
