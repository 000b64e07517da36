"""Turn per-task losses into one update: method weights → one weighted backward."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Literal

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.engine.comm import Communicator
from polytask.engine.jacobian import JacobianComputer, gramian
from polytask.methods.base import Method, Step, get_method

Mode = Literal["auto", "parameters", "features"]


class Engine:
    """Computes what a method ``needs`` and applies d = Σ wᵢ ∇Lᵢ into ``.grad``.

    Args:
        method: a Method or a registry name.
        shared_params: θ, the parameters every task's gradient is compared on (a subset, such
            as the last shared layer, is allowed).
        mode: where Gramian methods compare gradients: ``parameters`` (θ, exact), ``features``
            (the shared representation z, ≈ one backward) or ``auto`` (``features`` only for
            methods that declare ``needs == "features"``).
        every: recompute the weights every ``every`` steps and reuse them in between.
        seed: seed of the generator handed to random methods.
        jacobian: ``loop`` (one backward per task), ``batched`` (vmapped, ``chunk_size`` tasks at
            a time) or ``auto`` (time both on the first steps, keep the faster).
        task_clip: per-task gradient-norm clipping before aggregation: each task's gradient on θ
            is scaled to norm ≤ ``task_clip`` (the method sees the clipped gradients, and the
            task's weight, heads included, carries the same factor). Needs the task Jacobian.
        comm / reduce_params: data-parallel training. Each rank passes losses whose mean over
            ranks is the global loss; the engine averages the loss values, the task Jacobian or
            sums the feature Gramians so that every rank computes the same weights, then averages
            the gradients of ``reduce_params`` once (θ's update is already global when J was
            averaged, so only the other parameters are reduced then).
    """

    def __init__(self, method: str | Method, shared_params: Iterable[Tensor], *, mode: Mode = "auto",
                 every: int = 1, seed: int = 0, jacobian: str = "auto", chunk_size: int | None = None,
                 task_clip: float | None = None, comm: Communicator | None = None,
                 reduce_params: Iterable[Tensor] | None = None) -> None:
        self.method = get_method(method)
        self.shared = [p for p in shared_params if p.requires_grad]
        if mode not in ("auto", "parameters", "features"):
            raise InvalidParameterError(f"`mode` of the engine must be auto, parameters or features; found {mode!r}")
        if not isinstance(every, int) or every < 1:
            raise InvalidParameterError(f"`every` of the engine must be an int >= 1; found {every!r}")
        self.mode = mode
        self.every = every
        self.generator = torch.Generator().manual_seed(seed)
        self._cached: tuple[tuple[str, ...], Tensor] | None = None
        self.jacobian = JacobianComputer(jacobian, chunk_size)
        self.feature_jacobian = JacobianComputer(jacobian, chunk_size)
        if task_clip is not None and not (isinstance(task_clip, (int, float)) and task_clip > 0):
            raise InvalidParameterError(f"`task_clip` of the engine must be > 0 or None; found {task_clip!r}")
        self.task_clip = task_clip
        self.comm = comm
        self.reduce_params = [p for p in (reduce_params or []) if p.requires_grad]
        if comm is not None and not self.reduce_params:
            raise InvalidParameterError("data-parallel engine needs `reduce_params` (every trainable parameter)")
        self.last_tasks: tuple[str, ...] = ()
        self.last_gramian: Tensor | None = None
        self.last_clip: Tensor | None = None
        self.last_losses: Tensor | None = None

    @property
    def needs(self) -> str:
        needs = self.method.needs
        if needs == "gramian" and self.mode == "features":
            return "features"
        return needs

    def state_dict(self) -> dict:
        cached = None if self._cached is None else {"tasks": list(self._cached[0]), "w": self._cached[1]}
        return {"generator": self.generator.get_state(), "cached": cached}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.set_state(state["generator"])
        c = state.get("cached")
        self._cached = None if c is None else (tuple(c["tasks"]), c["w"])

    def backward(self, losses: Mapping[str, Tensor | None], *, features: Iterable[Tensor] | None = None,
                 index: int = 0, epoch: int = 0, extra_loss: Tensor | None = None,
                 scale: float = 1.0, diagnose: bool = False) -> dict[str, float]:
        """Accumulate the update into ``.grad`` and return the task weights.

        ``losses`` maps every task to its scalar loss, or ``None`` when the task has no labelled
        sample this step (it gets weight 0 and no gradient). ``features`` are the shared
        representation tensors (needed in ``features`` mode). ``extra_loss`` (e.g. a soft-sharing
        penalty) is added with weight 1. ``scale`` multiplies the total (a gradient scaler's loss
        scale, or gradient accumulation) without changing the weights: per-task gradients are taken
        of the scaled losses (so fp16 gradients do not underflow) and unscaled before the method
        sees them; if they are not finite (a scaler overflow) the method is skipped this step and
        the non-finite update is left for the scaler to discard. ``diagnose`` forces the task
        Jacobian on θ this step (its Gramian is kept in ``last_gramian`` for gradient-health logs,
        and reused for the update, so the step costs what a Gramian method's step costs).
        """
        active = tuple(t for t, v in losses.items() if v is not None)
        self.last_tasks, self.last_gramian, self.last_clip = active, None, None
        if not active:
            if extra_loss is not None:
                (extra_loss * scale).backward()
            if self.comm is not None:
                self.comm.mean_grads_(self.reduce_params)
            return {t: 0.0 for t in losses}
        parts: list[Tensor] = [losses[t] for t in active]  # type: ignore[misc]
        vec = torch.stack(parts)
        detached = vec.detach() if self.comm is None else self.comm.mean_(vec.detach().clone())
        self.last_losses = detached
        step = Step(tasks=active, losses=detached, index=index, epoch=epoch, generator=self.generator)
        needs = self.needs
        reuse = self._cached is not None and self._cached[0] == active and index % self.every != 0
        jacobian = None
        if needs in ("gramian", "jacobian") and not reuse or diagnose or self.task_clip is not None:
            jacobian = self.jacobian([p * scale for p in parts] if scale != 1.0 else parts, self.shared)
            if scale != 1.0:
                jacobian.div_(scale)
            if self.comm is not None:
                self.comm.mean_(jacobian)
            self.last_gramian = gramian(jacobian)
        clip = self._clip_factors()
        if reuse:
            w = self._cached[1]  # type: ignore[index]
        else:
            if needs == "features":
                zs = [z for z in (features or []) if z.requires_grad]
                if not zs:
                    raise InvalidParameterError(
                        f"method '{type(self.method).__name__}' runs in features mode but the model gave no shared representation")
                scaled = [p * scale for p in parts] if scale != 1.0 else parts
                step.gramian = gramian(self.feature_jacobian(scaled, zs)) / scale ** 2
                if self.comm is not None:  # shards are disjoint: cross-rank blocks of J_z are zero
                    step.gramian = self.comm.sum_(step.gramian) / self.comm.world_size ** 2
            elif needs in ("gramian", "jacobian"):
                step.gramian = self.last_gramian
                step.jacobian = jacobian if needs == "jacobian" else None
            if clip is not None and step.gramian is not None:
                # per-task clipping acts on the gradients the method sees, as if each gᵢ were cᵢ gᵢ
                step.gramian = clip[:, None] * step.gramian * clip[None, :]
                step.jacobian = None if step.jacobian is None else clip[:, None] * step.jacobian
            if step.gramian is not None and not bool(torch.isfinite(step.gramian).all()):
                w, step.jacobian = torch.ones_like(vec), None
            else:
                w = self.method.weights(step)
            if w.shape != (len(active),):
                raise InvalidParameterError(
                    f"method '{type(self.method).__name__}' returned weights of shape {tuple(w.shape)}; expected ({len(active)},)")
            if self.every > 1:
                self._cached = (active, w.detach())
        applied = w if clip is None else w * clip
        total = (applied * vec).sum()
        penalty = self.method.penalty(step, vec)
        if penalty is not None:
            total = total + penalty
        if extra_loss is not None:
            # a regulariser on the parameters themselves (soft sharing), not a task: its gradient
            # is added as is, wherever it lands (shared parameters included)
            (extra_loss * scale).backward(retain_graph=True)
        if jacobian is not None and self.shared:
            # J is already materialised: put d = Jᵀ w (or the method's direction) on θ directly and
            # back-propagate the total only into the other parameters, skipping a second pass
            # through the shared encoder.
            direction = (self.method.direction(step) if self.method.returns_direction and step.jacobian is not None
                         else applied.detach() @ jacobian)
            self._add_flat_grad(direction * scale)
            others = _other_leaves(total, self.shared)
            if others:
                torch.autograd.backward(total * scale, inputs=others)
            if self.comm is not None:
                shared = {id(p) for p in self.shared}
                self.comm.mean_grads_([p for p in self.reduce_params if id(p) not in shared])
        else:
            (total * scale).backward()
            if self.comm is not None:
                self.comm.mean_grads_(self.reduce_params)
        weights = {t: 0.0 for t in losses}
        weights.update(zip(active, applied.detach().tolist(), strict=True))
        return weights

    def _clip_factors(self) -> Tensor | None:
        """cᵢ = min(1, max_norm / ‖gᵢ‖) on θ, when per-task clipping is on."""
        if self.task_clip is None or self.last_gramian is None:
            return None
        norms = self.last_gramian.diagonal().clamp_min(0).sqrt()
        factors = (self.task_clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        self.last_clip = factors
        return factors.to(self.last_gramian.dtype)

    def _add_flat_grad(self, flat: Tensor) -> None:
        offset = 0
        for p in self.shared:
            n = p.numel()
            g = flat[offset:offset + n].view_as(p).to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g
            offset += n


def _other_leaves(total: Tensor, exclude: list[Tensor]) -> list[Tensor]:
    """Leaf tensors requiring grad that ``total`` depends on, minus ``exclude``."""
    skip = {id(p) for p in exclude}
    seen: set[int] = set()
    leaves: list[Tensor] = []
    stack = [total.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)
        if var is not None:
            if id(var) not in skip:
                leaves.append(var)
            continue
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


def backward(losses: Mapping[str, Tensor | None], shared_params: Iterable[Tensor], method: str | Method = "equal",
             *, features: Iterable[Tensor] | None = None, mode: Mode = "auto", index: int = 0) -> dict[str, float]:
    """One multi-task backward from any training loop.

    Leaves d = Σ wᵢ ∇Lᵢ in ``.grad`` of the shared and private parameters and returns the task
    weights by name. ``method`` is a registry name (``"pcgrad"``) or a Method object; keep the
    object between calls for stateful methods, or use :class:`Engine` directly.
    """
    engine = Engine(method, shared_params, mode=mode)
    if isinstance(method, str):
        engine.method.setup(list(losses))
    return engine.backward(losses, features=features, index=index)
