"""The engine for a model whose parameters are sharded across ranks (torch FSDP2, ``fully_shard``).

Under fully sharded data parallelism (Zhao et al., "PyTorch FSDP: Experiences on Scaling Fully
Sharded Data Parallel", VLDB 2023) rank r holds one slice of every parameter; a module's full
parameters exist only while its forward or backward runs, and each backward ends with a
reduce-scatter that leaves rank r the average over ranks of its slice's gradient. The task
Jacobian on θ is then split by columns: rank r holds J_r = J[:, slice r] of the *global* J
(every rank's batch shard included, as the DDP path's averaged J), so

    G = J Jᵀ = Σ_r J_r J_rᵀ

is exact from one all-reduce of T² values, and each rank applies the update d_r = J_rᵀ w to its
own slice. No rank holds J (T × |θ|), and a module's parameters are whole only during its own
forward and backward (or, for the ``keep_gathered`` units, from their forward through the step's
backward passes, and after an evaluation's forward).
The per-task reduce-scatters still move T × |θ| values, as FSDP's own gradient reduction would for
T backward passes: the data-parallel part of the reduction that no Gramian can avoid.

Departures: methods that need J itself (``needs = "jacobian"``: MoCo, GradDrop, GREAT) are
refused: their direction is a function of whole columns and norms of J that no rank holds.
Bilevel methods (``Method.lookahead``) are refused too: their outer batch is evaluated with the
model's parameters replaced (``torch.func.functional_call``), which sharded parameters do not
support. ``every > 1`` with unweighted heads is refused: on a step without J the engine splits
one backward between θ and the heads by parameter identity, and FSDP's parameters seen by
autograd are not the sharded ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.engine.backward import Engine, _unique
from polytask.engine.comm import Communicator
from polytask.engine.jacobian import JacobianComputer, cross_gramian, gramian, jacobian_dtype
from polytask.methods.base import Method, Update


def local_shard(tensor: Tensor) -> Tensor:
    """This rank's slice of a sharded tensor (a DTensor), or the tensor itself."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class ShardedEngine(Engine):
    """:class:`Engine` for parameters sharded by FSDP2; same arguments, plus:

    Args:
        sharded_params: every trainable parameter FSDP manages (the model's): their gradients
            are reduced by FSDP's own reduce-scatters, so the engine reduces only the others in
            ``reduce_params`` (a method's learnable weights).
        comm: required (the process group's ranks hold the shards).
        keep_gathered: FSDP units (``fully_shard`` ed modules) whose parameters stay gathered
            from their forward through the T per-task backward passes of a step instead of being
            gathered again for each: T fewer all-gathers of them a step (about half the step's
            traffic), at the cost of holding those units' full parameters for the whole Jacobian
            (and after a forward without backward, an evaluation's, until the next step's passes).
            Default: none (every unit is re-gathered, the memory FSDP promises).

    Task gradients on θ are taken by one ``backward`` per task (FSDP's hooks run only in a real
    backward), each leaving the rank's slice of every parameter's gradient; the rows of all
    sharded parameters are kept, so the heads and the layers under ``last_shared`` receive their
    exact share (``heads`` weighted: Σ wᵢ ∇Lᵢ, unweighted: Σ ∇Lᵢ) without another backward.
    """

    def __init__(self, method: str | Method, shared_params: Iterable[Tensor], *, sharded_params: Iterable[Tensor],
                 comm: Communicator | None, reduce_params: Iterable[Tensor] = (),
                 keep_gathered: Iterable[nn.Module] = (), **engine: Any) -> None:
        if comm is None:
            raise InvalidParameterError("the sharded (FSDP) engine needs the process group's Communicator (comm=)")
        sharded = [p for p in sharded_params if p.requires_grad]
        ids = {id(p) for p in sharded}
        others = [p for p in reduce_params if p.requires_grad and id(p) not in ids]
        super().__init__(method, shared_params, comm=comm, reduce_params=[*sharded, *others], **engine)
        self.reduce_params = others  # FSDP reduces the sharded parameters' gradients itself
        if self.lookahead:
            raise InvalidParameterError(
                f"'{self.name}' evaluates an outer batch with θ replaced by θ + δ (torch.func.functional_call), "
                "which FSDP's sharded parameters do not support; use run.distributed: ddp")
        if self.method.needs == "jacobian":
            raise InvalidParameterError(
                f"'{self.name}' returns a direction computed from the whole task Jacobian J, which no rank holds "
                "under run.distributed: fsdp (each has a slice of θ); use distributed: ddp, or a Gramian method")
        if self.every > 1 and self.heads == "unweighted":
            raise InvalidParameterError(
                f"every={self.every} with heads='unweighted' splits one backward between θ and the heads by "
                "parameter identity, which FSDP's gathered parameters do not keep; under run.distributed: fsdp use "
                "every=1 or engine.heads: weighted")
        theta = {id(p) for p in self.theta}
        shared = {id(p) for p in self.shared}
        missing = [p for p in self.shared if id(p) not in ids]
        if missing:
            raise InvalidParameterError(
                f"{len(missing)} shared parameter(s) are not sharded by FSDP; shard the model with "
                "polytask.train.fsdp.shard_model before building the engine")
        # column order of the per-rank Jacobian: θ first (its block is what the method compares),
        # then the other shared parameters (below the last shared layer), then the task-specific ones
        self.order = ([p for p in sharded if id(p) in theta] + [p for p in sharded if id(p) in shared - theta]
                      + [p for p in sharded if id(p) not in shared])
        self.sizes = [local_shard(p).numel() for p in self.order]
        self.n_theta = sum(n for p, n in zip(self.order, self.sizes, strict=True) if id(p) in theta)
        self.n_shared = sum(n for p, n in zip(self.order, self.sizes, strict=True) if id(p) in shared)
        self._rest: list[Tensor] = []  # the non-θ columns of each Jacobian taken this step
        #: per parameter of ``order``: whether any task's pass this step reached it (FSDP reduces the passes'
        #: gradients, so every rank agrees); one that none reached keeps grad None, as in one process
        self._reached: list[bool] | None = None
        self._keep_gathered: list[nn.Module] = []
        self.keep_gathered = keep_gathered  # type: ignore[assignment]

    @property
    def keep_gathered(self) -> list[nn.Module]:
        """The units kept gathered from their forward through the step's backward passes."""
        return self._keep_gathered

    @keep_gathered.setter
    def keep_gathered(self, units: Iterable[nn.Module]) -> None:
        # kept from the forward on too: a unit under the model's root unit frees its parameters after its
        # forward, and gathering them again for the passes would be one all-gather more a step
        units = list(units)
        for unit in self._keep_gathered:
            if unit not in units:
                unit.set_reshard_after_forward(True, recurse=False)  # type: ignore[operator]
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
        self._keep_gathered = units

    # ---------------------------------------------------------------- the hooks of Engine.backward
    def _hook_tensors(self) -> list[Tensor]:
        """The sharded parameters too (the heads, which FSDP's own reduce-scatter would run the hooks of
        in each task's pass), whether or not ``params`` were given."""
        return _unique([*super()._hook_tensors(), *self.order])

    def _follow_trainable(self) -> None:
        raise InvalidParameterError(
            "a parameter's requires_grad changed after the sharded (FSDP) engine was made: its Jacobian's columns "
            "and FSDP's units are laid out for the parameters that trained then; build the Trainer again")

    def _jacobian(self, computer: JacobianComputer, parts: list[Tensor], inputs: list[Tensor], scale: float) -> Tensor:
        if computer is not self.jacobian:  # J_z on the features: activations, not sharded
            return super()._jacobian(computer, parts, inputs, scale)
        rows = torch.empty(len(parts), sum(self.sizes), dtype=jacobian_dtype(self.order), device=self.order[0].device)
        reached = self._reached or [False] * len(self.order)
        for i, loss in enumerate(parts):
            for p in self.order:
                p.grad = None
            last = i == len(parts) - 1
            for unit in self.keep_gathered:  # gathered once for the step's backward passes, freed after the last
                unit.set_reshard_after_backward(last, recurse=False)  # type: ignore[operator]
            (loss * scale if scale != 1.0 else loss).backward(retain_graph=True)
            offset = 0
            for k, (p, n) in enumerate(zip(self.order, self.sizes, strict=True)):
                segment = rows[i, offset:offset + n]
                if p.grad is None:  # this task's loss does not reach p (another task's head)
                    segment.zero_()
                else:
                    segment.copy_(local_shard(p.grad).reshape(-1))
                    reached[k] = True
                offset += n
        self._reached = reached
        for p in self.order:
            p.grad = None
        for unit in self.keep_gathered:  # a unit the last task's backward did not reach is still gathered
            unit.reshard()  # type: ignore[operator]
        if scale != 1.0:
            rows.div_(scale)
        self._rest.append(rows[:, self.n_theta:])
        return rows[:, :self.n_theta]

    def _theta_gramian(self, jacobian: Tensor) -> Tensor:
        """Σ over ranks of the local column block's J_r J_rᵀ: the exact G (T² values all-reduced)."""
        return self.comm.sum_(gramian(jacobian))  # type: ignore[union-attr]

    def _part_gramians(self, part_jacobians: Sequence[Tensor]) -> Tensor:
        local = torch.stack([torch.stack([cross_gramian(a, b) for b in part_jacobians]) for a in part_jacobians])
        return self.comm.sum_(local)  # type: ignore[union-attr]

    def _apply(self, vec: Tensor, applied: Tensor, update: Update, jacobian: Tensor | None,
               feature_jacobian: list[Tensor] | None, extra_loss: Tensor | None, scale: float,
               clip: Tensor | None, use_direction: bool) -> None:
        rest, self._rest = self._rest, []
        reached, self._reached = self._reached, None
        if jacobian is None or not self.theta:
            # no J this step (loss methods, features): one ordinary backward, FSDP reduces it
            super()._apply(vec, applied, update, jacobian, feature_jacobian, extra_loss, scale, clip, use_direction)
            return
        if extra_loss is not None:
            self._hold_more(self._leaves(extra_loss, []))  # its leaves' hooks run once, at the step's end
            (extra_loss * scale).backward(retain_graph=True)
        head = applied if self.heads == "weighted" else (clip if clip is not None else torch.ones_like(applied))
        # the Jacobian of the update's loss: with batch parts, the mean over the parts' Jacobians
        # (θ's block was already averaged in place by Engine.backward)
        others = rest[0] if len(rest) == 1 else torch.stack(rest).mean(dim=0)
        w = applied.detach().to(jacobian.dtype)
        flat = torch.cat([w @ jacobian, w @ others[:, :self.n_shared - self.n_theta],
                          head.detach().to(jacobian.dtype) @ others[:, self.n_shared - self.n_theta:]]) * scale
        offset = 0
        with torch.no_grad():
            for k, (p, n) in enumerate(zip(self.order, self.sizes, strict=True)):
                if reached is None or reached[k]:  # a zero gradient would still move it under momentum or Adam
                    self._add_grad(p, flat[offset:offset + n])
                offset += n
        # a method's own parameters (weights that learn, a penalty) are reached by the total too
        total = (applied * vec).sum() if self.heads == "weighted" else (head.detach() * vec).sum()
        if update.penalty is not None:
            total = total + update.penalty
        reduced = self._reduced()
        owned = {id(p) for p in reduced}
        reached = [p for p in self._leaves(total, []) if id(p) in owned]
        if reached:
            torch.autograd.backward(total * scale, inputs=reached)
        self.comm.mean_grads_(reduced)  # type: ignore[union-attr]

    @staticmethod
    def _add_grad(param: Tensor, values: Tensor) -> None:
        """Add ``values`` (this rank's slice, flat) to the sharded gradient of ``param``."""
        if param.grad is not None:
            local_shard(param.grad).add_(values.view_as(local_shard(param.grad)).to(param.dtype))
            return
        local = local_shard(param)
        grad = values.view_as(local).to(param.dtype).clone()
        if hasattr(param, "to_local"):
            from torch.distributed.tensor import DTensor

            grad = DTensor.from_local(grad, param.device_mesh, param.placements, run_check=False,
                                      shape=param.shape, stride=param.stride())
        param.grad = grad
