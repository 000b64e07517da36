"""Collective operations for data-parallel training (torch.distributed: gloo on CPU, nccl on GPU).

The engine decides what crosses the network, because exact multi-task methods need more than
the averaged gradient: every rank must see the same task losses (loss-based methods), the same
task Jacobian (Gramian methods) or the same feature Gramian, so that all ranks compute the same
weights. The final update is then reduced once, like DDP's gradient all-reduce.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


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
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size())

    def sum_(self, tensor: Tensor) -> Tensor:
        self.bytes += tensor.numel() * tensor.element_size()
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def mean_(self, tensor: Tensor) -> Tensor:
        return self.sum_(tensor).div_(self.world_size)

    def mean_grads_(self, params: Sequence[Tensor]) -> None:
        """Average ``.grad`` of ``params`` across ranks in one flat all-reduce (missing grads as 0)."""
        params = [p for p in params if p.requires_grad]
        if not params:
            return
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        self.mean_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset:offset + n].view_as(p).clone()
            offset += n

    def broadcast_object(self, obj: object) -> object:
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
