"""Fully sharded data parallelism for the Trainer (``run.distributed: fsdp`` under torchrun).

The model is sharded with torch's FSDP2 (``torch.distributed.fsdp.fully_shard``; Zhao et al.,
"PyTorch FSDP", VLDB 2023): every module that owns parameters becomes one FSDP unit, under the
model itself as the root unit, so a module's full parameters exist only during its own forward
and backward, and each rank keeps 1/W of every parameter, its gradient and its optimiser state.
The engine's sharded variant
(:class:`polytask.engine.sharded.ShardedEngine`) computes the exact task Gramian from the ranks'
column blocks. FSDP2 runs on CPU with gloo as on GPUs with nccl (torch ≥ 2.6); FSDP1
(``FullyShardedDataParallel``) wraps the model in a module whose forward is the only entry
point, whereas polytask calls ``encode`` and ``decode`` separately, so FSDP1 is not used.

Checkpoints hold the full (gathered) model and optimiser state, so a run directory written under
FSDP is read by ``polytask eval`` / ``predict`` / ``polytask.load`` like any other, and resumes
under FSDP with any number of ranks (each cuts its slice from the full tensors). Gathering is
collective: every rank calls :func:`full_state` at the same point.

Departures: units are the modules that own parameters directly (a size-based wrapping policy
would group small layers; the gain is fewer collectives, the cost a coarser memory peak), but for
parameter containers, whose parameters the unit above holds. So a parameter must be read inside
its own module's ``forward`` (or, for a container's, its holder's), as every torch layer's is: one
read elsewhere (a parent's ``forward``, ``extra_loss``) meets a sharded DTensor, and torch refuses
to mix it with ordinary tensors ("got mixed torch.Tensor and DTensor"); use ``distributed: ddp``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn


def owners(model: nn.Module) -> list[nn.Module]:
    """The modules that own trainable parameters directly, in registration order, but for parameter
    containers (``nn.ParameterList``, ``nn.ParameterDict``): they have no forward of their own (their
    parameters are read in a parent's, cross-stitch's mixing weights in the model's ``encode``), so a
    unit made of one was never gathered ("mixed torch.Tensor and DTensor"); the unit above them (the
    model's root unit at the top) holds their parameters instead."""
    return [m for m in model.modules() if not isinstance(m, (nn.ParameterList, nn.ParameterDict))
            and any(p.requires_grad for p in m.parameters(recurse=False))]


#: the model's methods the Trainer calls besides ``forward``: FSDP runs its hooks around them too
ENTRY_POINTS = ("encode",)


def shard_model(model: nn.Module) -> nn.Module:
    """Shard every parameter-owning module of ``model`` in place with FSDP2, and the model itself
    as the root unit, and return ``model``.

    Why the root: FSDP2 makes the first unit to run a forward the root of the units below it, and
    a root keeps its parameters gathered after its forward (for training, its backward would gather
    them again at once). With the owners alone every unit was a root: each stayed gathered from its
    forward until a backward reached it, and after an evaluation (a forward without backward) or for
    a head no task's loss reached, for good, so every rank held the whole model. Under the model's
    unit the others free their parameters after their own forward and gather them again for their
    backward. ``encode`` runs the root's hooks as ``forward`` does (its output is what the losses'
    backward passes through: the root's final callback is queued there); ``decode`` need not: the
    units it runs (the heads) run their own."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    units = owners(model)
    for module in units:
        if module is not model:
            fully_shard(module)
    # the root's own parameters (cross-stitch's mixing weights) freed after its forward too, as the
    # others: FSDP2 keeps a root's gathered by default, which after an evaluation meant for good
    fully_shard(model, reshard_after_forward=True)
    for name in ENTRY_POINTS:
        if hasattr(model, name):
            register_fsdp_forward_method(model, name)
    return model


def _whole(value: Any) -> Any:
    """A sharded tensor gathered whole on CPU (collective); anything else unchanged."""
    return value.full_tensor().cpu() if hasattr(value, "full_tensor") else value


def _slice_like(value: Any, like: Any) -> Any:
    """A full tensor cut to this rank's slice, sharded as ``like``; anything else unchanged."""
    if not (isinstance(value, Tensor) and hasattr(like, "device_mesh")) or value.shape != like.shape:
        return value
    from torch.distributed.tensor import distribute_tensor

    # every rank holds the full tensor (it loaded the same checkpoint): each keeps its chunk, no scatter
    return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The model's and the optimiser's state with every sharded tensor gathered whole on CPU.

    Collective: every rank calls it, at the same point (the tensors are gathered in the same order)."""
    model_state = {k: _whole(v) for k, v in model.state_dict().items()}
    optim = optimizer.state_dict()
    state = {i: {k: _whole(v) for k, v in s.items()} for i, s in optim["state"].items()}
    return model_state, {**optim, "state": state}


def load_full_state(model: nn.Module, model_state: Mapping[str, Tensor], optimizer: torch.optim.Optimizer,
                    optim_state: Mapping[str, Any] | None = None) -> None:
    """Load a full state (``full_state``'s) into the sharded model and optimiser: each rank keeps its slice."""
    current = model.state_dict()
    model.load_state_dict({k: _slice_like(v, current.get(k)) for k, v in model_state.items()})
    if optim_state is None:
        return
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {i: {k: _slice_like(v, params[int(i)]) for k, v in s.items()} for i, s in optim_state["state"].items()}
    optimizer.load_state_dict({**optim_state, "state": state})
