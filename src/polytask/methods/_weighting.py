"""Shared pieces of the loss-weighting methods: per-task state keyed by task name, safe logs.

Per-task state lives in tensors whose first dimension follows ``self.all_tasks`` (fixed by
``setup``); the task names travel in ``state_dict()`` as extra state, so a checkpoint is only
loaded into a method that was set up with the same tasks, or into a fresh one, which adopts them.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError, closest
from polytask.methods._host import _TYPECODES, host_tensor
from polytask.methods.base import Method, Step

#: Floor for losses that enter a logarithm or a denominator (FAMO's and DB-MTL's reference code add 1e-8).
EPS = 1e-8
#: Adam's defaults (``torch.optim.Adam``'s), for the methods that step their own logits with it
BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8


def owner(method: Method) -> str:
    """The registry name used in error messages (``DWA`` → ``dwa``)."""
    return getattr(type(method), "registry_name", type(method).__name__)


def check_tasks(method: Method, param: str, names: Sequence[str], tasks: Sequence[str]) -> None:
    """Fail when a per-task hyper-parameter names a task that does not exist."""
    for name in names:
        if name not in tasks:
            raise InvalidParameterError(
                f"`{param}` of `{owner(method)}` names unknown task '{name}'.{closest(name, tasks)} "
                f"Tasks: {', '.join(tasks)}")


def softmax(values: Sequence[float]) -> list[float]:
    """softmax of a few Python floats: exp(x − max x) / Σ exp(x − max x), as ``torch.softmax``."""
    top = max(values)
    e = [math.exp(x - top) for x in values]
    total = sum(e)
    return [x / total for x in e]


def as_weights(values: Sequence[float], step: Step) -> Tensor:
    """Weights computed on the host as a tensor of the step's losses' dtype and device."""
    return host_tensor(values, step.losses)


class PerTaskMethod(Method):
    """A method whose state is one entry per task, in ``all_tasks`` order.

    Subclasses create their state in :meth:`reset_state` (called by ``setup``, which then moves
    it to the method's device) and read the rows of the active tasks with :meth:`index`.
    Learnable state is created with ``param.data = ...`` so that an optimizer built before
    ``setup`` (as the Trainer does) holds the right tensors. Used without ``setup``, the method
    sets itself up with the first step's tasks.
    """

    #: Buffers that stay on the host, in their dtype, wherever the method is moved. A method whose
    #: per-step arithmetic is on T numbers does it in Python floats on them (read with ``tolist``,
    #: written back by :meth:`store_host_values`): one tensor operation costs microseconds even on
    #: a T-element tensor (and a kernel launch on CUDA), and a small model's whole step is about a
    #: millisecond. Only the weights then go to the losses' device, as one tensor.
    host_buffers: ClassVar[tuple[str, ...]] = ()

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        device = self._device()
        super().setup(tasks, sizes=sizes, static_weights=static_weights)
        self.reset_state(len(self.all_tasks))
        self.to(device)
        self._pack_host_buffers()

    def reset_state(self, num_tasks: int) -> None:
        """(Re)create the per-task buffers / parameters for ``num_tasks`` tasks."""

    def index(self, step: Step) -> Tensor:
        """Positions of ``step.tasks`` in ``all_tasks`` (sets up lazily with the step's tasks).

        The tensor is made once per set of active tasks and reused while they stay the same (a
        step of a small model costs a few hundred microseconds, and building it was a tenth of a
        loss-weighting method's cost); callers only read it."""
        tasks: tuple[str, ...] | None = getattr(self, "all_tasks", None)
        if tasks is None:
            self.setup(step.tasks)
            tasks = self.all_tasks
        return self._indexed(step, tasks)[0]

    def _indexed(self, step: Step, tasks: tuple[str, ...]) -> tuple[Tensor, bool]:
        cached = self.__dict__.get("_index_cache")
        if cached is not None and cached[0] is tasks and cached[1] == step.tasks:
            return cached[2], cached[3]
        position = {t: i for i, t in enumerate(tasks)}
        missing = [t for t in step.tasks if t not in position]
        if missing:
            raise InvalidParameterError(
                f"`{owner(self)}` was set up for tasks {list(tasks)}; the step has unknown task(s) {missing}")
        index = torch.tensor([position[t] for t in step.tasks], dtype=torch.long, device=self._device())
        full = tuple(step.tasks) == tuple(tasks)
        self.__dict__["_index_cache"] = (tasks, tuple(step.tasks), index, full)
        return index, full

    def all_active(self, step: Step) -> bool:
        """True when the step's tasks are ``all_tasks`` in their order: then the rows of the
        active tasks are the whole state, and a method may skip gathering and scattering them."""
        self.index(step)
        return self.__dict__["_index_cache"][3]

    def rows(self, tensor: Tensor, step: Step) -> Tensor:
        """``tensor[self.index(step)]``, or ``tensor`` itself when every task is active in order
        (the same values, and for a parameter the same gradient, without an indexing operation)."""
        index = self.index(step)
        return tensor if self.all_active(step) else tensor[index]

    def host_values(self) -> list[list[float]]:
        """The host buffers' values, as Python lists, in ``host_buffers`` order."""
        packed = self._packed()
        if packed is not None:
            flat, n = packed[0].tolist(), packed[2]
            return [flat[k:k + n] for k in range(0, len(flat), n)]
        return [self._buffers[name].tolist() for name in self.host_buffers]  # type: ignore[union-attr]

    def store_host_values(self, values: Sequence[Sequence[float]]) -> None:
        """Write ``values`` (as :meth:`host_values` gives them) into the host buffers, in place."""
        packed = self._packed()
        if packed is not None:
            packed[0][:] = array(packed[1], [x for row in values for x in row])  # the same length: in place
            return
        for name, new in zip(self.host_buffers, values, strict=True):
            self._buffers[name].numpy()[...] = new  # type: ignore[union-attr]

    def _pack_host_buffers(self) -> None:
        """Where the host buffers are rows of one length and float dtype (FAMO's five per-task rows),
        make them the rows of one table over a Python ``array``, so that :meth:`host_values` reads
        them in one call and :meth:`store_host_values` writes them in one. Why: five reads and five
        writes through ``tolist`` and numpy were a fifth of FAMO's cost on a tiny model. The buffers
        keep their names, values and ``state_dict`` entries; a buffer replaced later (assigned, given
        new memory, or copied with the method) puts it back on the per-buffer reads and writes until
        it is packed again (``setup``, ``load_state_dict``)."""
        self.__dict__.pop("_host_rows", None)
        buffers = [self._buffers.get(name) for name in self.host_buffers]
        if len(buffers) < 2 or any(b is None for b in buffers):
            return
        first = buffers[0]
        code = _TYPECODES.get(first.dtype)  # type: ignore[union-attr]
        if code is None or first.dim() != 1 or not first.numel() or any(  # type: ignore[union-attr]
                b.dtype != first.dtype or b.shape != first.shape or not b.is_cpu for b in buffers):  # type: ignore[union-attr]
            return
        memory = array(code, torch.stack(buffers).flatten().tolist())  # type: ignore[arg-type]
        rows = tuple(torch.frombuffer(memory, dtype=first.dtype).view(len(buffers), -1).unbind())  # type: ignore[union-attr]
        for name, row in zip(self.host_buffers, rows, strict=True):
            self._buffers[name] = row
        self.__dict__["_host_rows"] = (memory, code, first.numel(), rows,  # type: ignore[union-attr]
                                       tuple(row.data_ptr() for row in rows))

    def _packed(self) -> tuple[array, str, int, tuple[Tensor, ...], tuple[int, ...]] | None:
        """The packed host buffers' memory, type code and row length, where every buffer is still its
        row there; else None."""
        packed = self.__dict__.get("_host_rows")
        if packed is None:
            return None
        buffers = self._buffers
        for name, row, pointer in zip(self.host_buffers, packed[3], packed[4]):
            if buffers[name] is not row or row.data_ptr() != pointer:
                return None
        return packed

    def positions(self, step: Step) -> tuple[int, ...]:
        """Positions of ``step.tasks`` in ``all_tasks``, as ints (for host arithmetic)."""
        self.index(step)
        cached = self.__dict__["_index_cache"]
        if len(cached) == 4:
            cached = self.__dict__["_index_cache"] = (*cached, tuple(cached[2].tolist()))
        return cached[4]

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # type: ignore[override]
        self.__dict__.pop("_index_cache", None)  # .to(device): the next index is made on the new device
        kept = {name: self._buffers[name] for name in self.host_buffers if name in self._buffers}
        out = super()._apply(fn, recurse)
        self._buffers.update(kept)
        return out

    def _device(self) -> torch.device:
        for tensor in (*self.parameters(), *self.buffers()):
            return tensor.device
        return torch.device("cpu")

    def get_extra_state(self) -> dict[str, Any]:
        return {"tasks": list(getattr(self, "all_tasks", ()))}

    def set_extra_state(self, state: Any) -> None:
        tasks = tuple(state.get("tasks", ()))
        mine = getattr(self, "all_tasks", None)
        if mine is None:
            if tasks:
                self.all_tasks = tasks
        elif tasks and mine != tasks:
            raise InvalidParameterError(
                f"the saved state of `{owner(self)}` is for tasks {list(tasks)}; this method was set up "
                f"for {list(mine)} (same names in the same order are required)")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        if getattr(self, "all_tasks", None) is None:
            # A fresh method adopts the saved shapes (its own tensors are still empty).
            for store in (self._buffers, self._parameters):
                for name, tensor in store.items():
                    saved = state_dict.get(prefix + name)
                    if tensor is not None and saved is not None and saved.shape != tensor.shape:
                        fresh = torch.empty(saved.shape, dtype=tensor.dtype, device=tensor.device)
                        if isinstance(tensor, torch.nn.Parameter):
                            tensor.data = fresh  # keeps the identity an optimizer holds
                        else:
                            store[name] = fresh
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if self.host_buffers and self._packed() is None:
            self._pack_host_buffers()  # a fresh method's buffers were replaced above (a packed one's copied into)


def adam_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, count: Tensor, *,
              lr: float, weight_decay: float, betas: tuple[float, float] = BETAS,
              eps: float = ADAM_EPS) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One element-wise Adam step (``torch.optim.Adam`` semantics, L2 weight decay) on plain tensors,
    or on one task's Python floats.

    Takes the rows of the tasks being updated (``count`` is each row's number of past steps) and
    returns their new (param, exp_avg, exp_avg_sq, count).
    """
    grad = grad + weight_decay * param
    b1, b2 = betas
    exp_avg = b1 * exp_avg + (1 - b1) * grad
    exp_avg_sq = b2 * exp_avg_sq + (1 - b2) * grad * grad
    count = count + 1
    corrected_avg = exp_avg / (1 - b1 ** count)
    corrected_sq = exp_avg_sq / (1 - b2 ** count)
    # ** 0.5: a square root on tensors, arrays and Python floats alike
    return param - lr * corrected_avg / (corrected_sq ** 0.5 + eps), exp_avg, exp_avg_sq, count


def adam_rows(method: Method, rows: Tensor, grad: Tensor, *, lr: float,
              names: tuple[str, str, str, str] = ("logits", "exp_avg", "exp_avg_sq", "adam_steps")) -> None:
    """One Adam step on the ``rows`` of ``method``'s buffer ``names[0]``, its moments and step counts
    held in the buffers ``names[1:]`` (the bilevel methods' learned weights, MOML's and FORUM's logits)."""
    buffers = [getattr(method, n) for n in names]
    param, exp_avg, exp_avg_sq, count = (b[rows] for b in buffers)
    new = adam_step(param, grad, exp_avg, exp_avg_sq, count, lr=lr, weight_decay=0.0)
    for buffer, value in zip(buffers, new, strict=True):
        buffer[rows] = value
