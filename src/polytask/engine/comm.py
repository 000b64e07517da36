"""Collective operations for data-parallel training (torch.distributed: gloo on CPU, nccl on GPU).

The engine decides what crosses the network, because exact multi-task methods need more than
the averaged gradient: every rank must see the same task losses (loss-based methods), the same
task Jacobian (Gramian methods) or the same feature Gramian, so that all ranks compute the same
weights. The final update is then reduced once, like DDP's gradient all-reduce.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from polytask.core.errors import InvalidParameterError


class Communicator:
    """All-reduce helpers over the default process group, counting the bytes they send."""

    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self.bytes = 0  # payload all-reduced so far (communication volume)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device) -> Communicator | None:
        """Join the process group torchrun describes (WORLD_SIZE > 1), or None for one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1 and not dist.is_initialized():
            return None
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # NCCL's collectives and object broadcasts run on the current device
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        elif device.type != "cuda" and dist.get_backend() == "nccl":
            raise InvalidParameterError(
                f"`run.device` is {str(device)!r} but the process group already started uses NCCL, which moves CUDA "
                "tensors only (the model would be broadcast from the host): set run.device to cuda or auto, or start "
                "the group with backend='gloo'")
        return cls(dist.get_rank(), dist.get_world_size())

    def sum_(self, tensor: Tensor) -> Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        return all_reduce_sum_(tensor)

    def mean_(self, tensor: Tensor) -> Tensor:
        return self.sum_(tensor).div_(self.world_size)

    def mean_grads_(self, params: Sequence[Tensor]) -> None:
        """Average ``.grad`` of ``params`` across ranks in one flat all-reduce (a missing grad counts
        as 0). A parameter no rank has a gradient for keeps ``grad = None``, as in one process: a zero
        gradient would still move it under momentum or Adam (and count an Adam step). Whether each
        rank has one travels in the same all-reduce, one value per parameter."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        has = [p.grad is not None for p in params]
        flat = torch.cat([*((p.grad if h else torch.zeros_like(p)).reshape(-1) for p, h in zip(params, has, strict=True)),
                          torch.tensor(has, dtype=params[0].dtype, device=params[0].device)])
        self.mean_(flat)
        # read back (a device sync) only where this rank lacks a gradient: where it has one, some rank does
        reached = has if all(has) else flat[-len(params):].tolist()
        offset = 0
        for p, mine, anyone in zip(params, has, reached, strict=True):
            n = p.numel()
            mean = flat[offset:offset + n].view_as(p)
            if mine:  # in place, as autograd accumulates (a caller may hold .grad), in the gradient's dtype and layout
                p.grad.copy_(mean)
            else:  # laid out as the parameter, as autograd's first gradient
                p.grad = torch.empty_like(p).copy_(mean) if anyone > 0 else None
            offset += n

    def broadcast_object(self, obj: object) -> object:
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """``tensor`` summed in place over the default process group's ranks. NCCL reduces CUDA
    tensors only, so under NCCL a host tensor (the ranks' label counts, the metrics' loss sums)
    makes the trip through the current CUDA device; gloo takes it as it is."""
    if tensor.device.type != "cuda" and dist.get_backend() == "nccl":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM)
        return tensor.copy_(on_device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _tensors(value: Any) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class CollectiveCounter(TorchDispatchMode):
    """Counts the bytes each rank puts on the wire for every collective issued inside it.

    Use as ``with CollectiveCounter(world) as counter: ...`` around a training step; it sees the
    engine's all-reduces and FSDP's all-gathers and reduce-scatters alike (they all pass through
    the ``c10d`` operators), in forward and backward. Bytes follow the ring algorithms' per-rank
    traffic, the usual measure of a collective's cost: an all-reduce of N bytes sends 2(W−1)/W·N,
    a reduce-scatter of an N-byte input and an all-gather of an N-byte output (W−1)/W·N, a
    broadcast N (counted on every rank). ``by_op`` splits the total by operator.
    """

    #: c10d operator → (index of the argument holding the tensors that set the volume, ring factor)
    OPS = {"allreduce_": (0, 2.0), "allreduce_coalesced_": (0, 2.0), "_allgather_base_": (0, 1.0),
           "allgather_": (0, 1.0), "_reduce_scatter_base_": (1, 1.0), "reduce_scatter_": (1, 1.0),
           "broadcast_": (0, None)}

    def __init__(self, world_size: int) -> None:
        super().__init__()
        self.world_size = world_size
        self.bytes = 0.0
        self.by_op: dict[str, float] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - the dispatcher's protocol
        if func.namespace == "c10d":
            name = func._schema.name.split("::")[-1]
            if name in self.OPS:
                index, factor = self.OPS[name]
                size = sum(t.numel() * t.element_size() for t in _tensors(args[index]))
                w = self.world_size
                sent = size if factor is None else factor * (w - 1) / w * size
                self.bytes += sent
                self.by_op[name] = self.by_op.get(name, 0.0) + sent
        return func(*args, **(kwargs or {}))
