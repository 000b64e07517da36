"""Turn per-task losses into one update: what the method needs → its update → one weighted backward."""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.core.options import options
from polytask.engine.autogram import AutogramGramian, AutogramUnavailable
from polytask.engine.comm import Communicator
from polytask.engine.jacobian import (
    JacobianComputer,
    JacobianPieces,
    _empty_jacobian,
    _write_row,
    accumulate_rows,
    accumulates,
    batched_grads,
    cross_gramian,
    dense,
    gramian,
    host_gramian,
    jacobian_dtype,
    row_views,
    transpose_times,
)
from polytask.engine.options import GRADIENT_METHOD_HEADS, EngineOptions
from polytask.engine.passes import accumulate, accumulate_seeded, loss_grads
from polytask.methods.base import Method, Step, Update, get_method

#: a closure over a bilevel method's outer batch: {id(parameter): replacement} → the tasks' losses there;
#: methods that also take steps on the inner batch (FORUM) call it with ``batch="inner"``
Outer = Callable[..., Mapping[str, Tensor | None]]


@dataclass(frozen=True)
class StepReport:
    """What one engine step did; loggers, health checks and diagnostics read it.

    Attributes:
        index: the engine's step counter for this step.
        tasks: the active tasks (those with a loss), in order.
        losses: their detached loss values (the mean over ranks when data-parallel), shape (T,).
        weights: the weight applied to every task given (0 for inactive ones), per-task clip
            factors included.
        compare: where the gradients were compared (``shared``, ``last_shared``, ``features``)
            or ``none`` for a loss-weighting method.
        heads: ``weighted`` or ``unweighted``: what the task-specific parameters received.
        gramian: G on the compared parameters θ (T×T) when the task Jacobian on θ was computed
            this step (gradient methods on θ, ``diagnose``, per-task clipping), else None. For a
            Jacobian method (``needs = "jacobian"``) only when the method read it, or with
            ``diagnose`` or per-task clipping: G is not formed for it otherwise.
        feature_gramian: G of the gradients w.r.t. the shared representation (``features``).
        clip: per-task clip factors cᵢ (T,) when per-task clipping is on.
        reused: the weights are those of an earlier step (``every`` > 1).
        fallback: why the method was not asked this step (e.g. a non-finite Gramian gave
            equal weights), or None.
        task_norms: ‖gᵢ‖ on θ (T,) where ``gramian`` is None but J was formed (a Jacobian method's
            step: the rows' norms of the finiteness check), so that a health check can still name
            a task; else None (``gramian``'s diagonal has them).
    """

    index: int
    tasks: tuple[str, ...]
    losses: Tensor
    weights: dict[str, float]
    compare: str
    heads: str
    gramian: Tensor | None = None
    feature_gramian: Tensor | None = None
    clip: Tensor | None = None
    reused: bool = False
    fallback: str | None = None
    task_norms: Tensor | None = None

    @property
    def task_losses(self) -> dict[str, float]:
        """Loss values by task name (one host sync)."""
        return dict(zip(self.tasks, self.losses.tolist(), strict=True))


class Engine:
    """Owns a method and everything it needs between steps, and applies d = Σ wᵢ ∇Lᵢ into ``.grad``.

    Keep one engine for a whole training run, whichever loop drives it (the Trainer, a plain
    PyTorch loop, Lightning, an RL agent): it holds the method and its state, the step counter
    and the seed of a counter-based random stream (step k draws from ``stream(seed, k)``), and
    it calls the method's ``setup`` with the task names of the first losses it sees when nobody
    did. ``state_dict()`` has all of it, so a checkpoint resumes the method exactly.

    Args:
        method: a Method or a registry name.
        shared_params: θ, every shared parameter (the encoder).
        last_shared_params: the last shared layer, for ``compare="last_shared"``.
        compare, heads, every, jacobian, chunk_size, gramian: :class:`EngineOptions`.
        seed: seed of the random stream handed to random methods (``Step.generator``).
        task_clip: per-task gradient-norm clipping before aggregation: each task's gradient on the
            compared parameters is scaled to norm ≤ ``task_clip`` (the method sees the clipped
            gradients, and the task's weight carries the same factor). Needs the task Jacobian.
        params: every trainable parameter the losses may reach (θ included), e.g. the model's and its
            objectives'. Given, the per-task passes of a step on θ that also return the heads'
            gradients (the J route's fused passes) ask for those outside θ directly instead of
            walking the step's autograd graph to find them: on a small model the walk was a tenth of
            a step. The first such step walks the graph once, and keeps walking every step if the
            losses reach a leaf outside ``params`` (a tensor that is not a parameter but requires
            grad). A leaf that only a later step reaches, outside ``params``, gets no gradient there.
        comm / reduce_params: data-parallel training. Each rank passes losses whose mean over
            ranks is the global loss; the engine averages the loss values, the task Jacobian or
            sums the feature Gramians so that every rank computes the same weights, then averages
            the gradients of ``reduce_params`` once (θ's update is already global when J was
            averaged, so only the other parameters are reduced then).
    """

    def __init__(self, method: str | Method, shared_params: Iterable[Tensor], *,
                 last_shared_params: Iterable[Tensor] | None = None, compare: str = "auto", heads: str = "auto",
                 every: int = 1, jacobian: str = "auto", chunk_size: int | None = None, gramian: str = "auto",
                 seed: int = 0, task_clip: float | None = None, comm: Communicator | None = None,
                 reduce_params: Iterable[Tensor] | None = None, params: Iterable[Tensor] | None = None,
                 **removed: Any) -> None:
        opts = options(EngineOptions, {**removed, "compare": compare, "heads": heads, "every": every,
                                       "jacobian": jacobian, "chunk_size": chunk_size, "gramian": gramian}, "engine")
        self.options = opts
        self.method = get_method(method)
        # each tensor once: a tensor listed twice (tied weights collected module by module) would count
        # twice in G, and the streamed no-J update wrote it twice
        given_shared = _unique(shared_params)
        self.shared = [p for p in given_shared if p.requires_grad]
        _check_leaves(self.shared)
        self.compare = self._resolve_compare(opts.compare)
        given_last = None
        if self.compare == "last_shared":
            if last_shared_params is None:
                whose = f" (the default of '{self.name}')" if opts.compare == "auto" else ""
                raise InvalidParameterError(
                    f"compare='last_shared'{whose} needs `last_shared_params`, the parameters of the last shared "
                    "layer (a polytask model gives them: model.last_shared_parameters())")
            given_last = _unique(last_shared_params)
            self.theta = [p for p in given_last if p.requires_grad]
        else:
            self.theta = self.shared
        self.heads = self._resolve_heads(opts.heads)
        if opts.every > 1 and self.method.needs != "gramian":
            why = ("its weights cost nothing to recompute, and a learnable one must see its loss every step"
                   if self.method.needs == "losses" else "it returns a new direction from the task Jacobian every step")
            raise InvalidParameterError(f"every={opts.every} reuses a gradient method's weights between "
                                        f"recomputations; '{self.name}' cannot reuse them: {why} (use every=1)")
        self.batch_parts = int(getattr(self.method, "batch_parts", 1))
        self.lookahead = bool(getattr(self.method, "lookahead", False))
        if self.lookahead and (self.batch_parts > 1 or self.compare == "features" or opts.every > 1):
            raise InvalidParameterError(
                f"'{self.name}' evaluates an outer batch at displaced parameters: it needs compare='shared' or "
                "'last_shared', every=1 and no batch parts")
        if self.batch_parts > 1 and (self.compare == "features" or opts.every > 1):
            raise InvalidParameterError(
                f"'{self.name}' compares task gradients on {self.batch_parts} parts of each batch, on the parameters: "
                "use compare='shared' or 'last_shared' and every=1")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise InvalidParameterError(f"`seed` of the engine must be an int; found {seed!r}")
        self.seed, self.every = seed, opts.every
        self.index = 0
        self._cached: tuple[tuple[str, ...], Tensor] | None = None
        #: a ``constant_weights`` method's answers: {(tasks, dtype, device): (weights, their floats)}
        self._constant: dict[tuple[Any, ...], tuple[Tensor, list[float]]] = {}
        #: the last answer of a method with a ``weights_key``: (key, (weights, their floats))
        self._reused: tuple[tuple[Any, ...], tuple[Tensor, list[float]]] | None = None
        self.jacobian = JacobianComputer(opts.jacobian, opts.chunk_size)
        self.feature_jacobian = JacobianComputer(opts.jacobian, opts.chunk_size)
        if task_clip is not None and not (isinstance(task_clip, (int, float)) and task_clip > 0):
            raise InvalidParameterError(f"`task_clip` of the engine must be > 0 or None; found {task_clip!r}")
        self.task_clip = task_clip
        self.comm = comm
        given_reduce = _unique(reduce_params or [])
        self.reduce_params = [p for p in given_reduce if p.requires_grad]
        given_params = None if params is None else _unique(params)
        #: the leaves outside θ the fused passes ask for: None until the first fused step has walked the
        #: graph (see ``params``), then ``params`` outside θ, or still None if the walk found more
        self._declared = None if given_params is None else [p for p in given_params if p.requires_grad]
        self._params = self._declared  # kept: ``_declared`` is used up by the first walk
        #: every tensor given, trainable or not, and which of them were trainable (see _follow_trainable)
        self._given = (given_shared, given_last, given_params, given_reduce)
        self._watched = _unique([*given_shared, *(self._given[1] or ()), *(given_params or ()), *given_reduce])
        self._trains = [p.requires_grad for p in self._watched]
        self._private_leaves: list[Tensor] | None = None
        self._reached_numel = 0  # of those, the values the first walk found reached
        if comm is not None and not self.reduce_params:
            raise InvalidParameterError("data-parallel engine needs `reduce_params` (every trainable parameter)")
        # loop unless batched is asked for: a timed choice would make the route (and its rounding) vary by run
        self.autogram = AutogramGramian("loop" if opts.jacobian == "auto" else opts.jacobian, opts.chunk_size,
                                        passes=opts.autogram_passes)
        #: how G on θ is computed: "jacobian", "autogram", or "auto" until the first step decides
        self.gramian_route = self._resolve_gramian(opts.gramian)
        self._no_j = False  # this step's G came from the autogram, which holds what d = Jᵀw needs
        #: the post-accumulate-grad hooks taken out for the step in progress (see backward)
        self._held: list[tuple[Tensor, dict[Any, Any], Tensor | None, int]] | None = None
        self._kept_jacobian: Tensor | None = None  # J's storage, kept from step to step (see _jacobian_storage)

    @property
    def name(self) -> str:
        return getattr(type(self.method), "registry_name", type(self.method).__name__)

    def _resolve_compare(self, compare: str) -> str:
        needs = self.method.needs
        if needs == "losses":
            if compare not in ("auto",):
                raise InvalidParameterError(
                    f"compare={compare!r} applies to gradient methods; '{self.name}' weights the losses and compares "
                    "no gradients (leave engine.compare at auto)")
            return "none"
        resolved = self.method.compare if compare == "auto" else compare
        if needs == "jacobian" and resolved == "features":
            raise InvalidParameterError(
                f"'{self.name}' returns an update direction on parameters, so it cannot compare gradients on the "
                "features; use compare='shared' or 'last_shared'")
        return resolved

    def _resolve_gramian(self, requested: str) -> str:
        if requested == "jacobian":
            return "jacobian"
        why = ("it needs the task Jacobian itself, not only its Gramian" if self.method.needs == "jacobian" else
               "it weights the losses and compares no gradients" if self.method.needs == "losses" else
               "it compares gradients on the features (J_z is already small)" if self.compare == "features" else
               f"it compares the task gradients of {self.batch_parts} batch parts" if self.batch_parts > 1 else
               "it evaluates an outer batch at displaced parameters" if self.lookahead else None)
        if requested == "autogram":
            if why is not None:
                raise InvalidParameterError(f"gramian='autogram' forms the Gramian of the task gradients without J; "
                                            f"'{self.name}' cannot use it: {why} (use gramian='jacobian' or 'auto')")
            if self.comm is not None:
                warnings.warn("gramian='autogram' under data parallelism: the Gramian of the averaged J has cross-rank "
                              "terms that per-rank Gramians lack; computing the task Jacobian instead", stacklevel=3)
                return "jacobian"
            return "autogram"
        if why is not None or self.comm is not None or self.compare == "last_shared":
            return "jacobian"  # last_shared: J on one layer is small
        return "auto"

    def _route(self, parts: list[Tensor]) -> str:
        """This step's way to G on θ. ``auto`` decides on its first step, from shapes alone (so that
        a run, and a run resumed from a checkpoint, take the same route every time): autogram when
        J would take more than half the free memory, or when layers it forms in closed form (Gram
        and rows routes) hold at least ``AUTOGRAM_SHARE`` of θ and J has at least
        ``SMALL_JACOBIAN`` entries (``SMALL_JACOBIAN_CUDA`` on a GPU); otherwise the J route, which
        the no-J Gramian would only repeat by other means. Why the size: below it the passes cost
        less than the no-J engine's fixed work per step (its graph walk, hooks and per-layer
        blocks), which on a tiny model made a step 1.7× the J route's on the CPU and 2× on a GPU."""
        if self.gramian_route != "auto":
            return self.gramian_route
        total = sum(p.numel() for p in self.theta)
        if len(parts) * total * self.theta[0].element_size() > _free_memory(self.theta[0].device) / 2:
            self.gramian_route = "autogram"
        elif len(parts) * total < (SMALL_JACOBIAN_CUDA if self.theta[0].is_cuda else SMALL_JACOBIAN):
            self.gramian_route = "jacobian"
        else:
            try:
                plan = self.autogram.planner.plan(parts, self.theta)
            except AutogramUnavailable:  # auto: the J route, as for any model the no-J Gramian would not pay on
                self.gramian_route = "jacobian"
                return self.gramian_route
            closed = sum(p.numel() for layer in plan.layers for p in layer.params)
            self.gramian_route = "autogram" if closed >= AUTOGRAM_SHARE * total else "jacobian"
        return self.gramian_route

    def _no_j_gramian(self, parts: list[Tensor], scale: float) -> Tensor | None:
        """G on θ without J, or None (after a one-line warning) when the model defeats it."""
        try:
            g = self.autogram(parts, self.theta, scale)
        except (AutogramUnavailable, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            warnings.warn(f"the no-J Gramian (engine.gramian) cannot be used for this model: {reason}; computing the "
                          "task Jacobian instead", stacklevel=4)
            self.gramian_route = "jacobian"
            return None
        self._no_j = True
        return g

    def _resolve_heads(self, heads: str) -> str:
        if self.method.needs == "losses":
            if heads == "unweighted":
                raise InvalidParameterError(
                    f"heads='unweighted' applies to gradient methods; '{self.name}' weights the losses themselves, so "
                    "each head receives its weighted loss's gradient (leave engine.heads at auto)")
            return "weighted"
        if heads != "auto":
            return heads
        return self.method.heads or GRADIENT_METHOD_HEADS

    def _reduced(self) -> list[Tensor]:
        """What data-parallel steps average over ranks: ``reduce_params`` and the method's own
        trainable parameters (uncertainty's log-variances), which a caller may leave out of them (each
        rank's update of them then went its own way)."""
        extra = [p for p in self.method.parameters() if p.requires_grad]
        return _unique([*self.reduce_params, *extra]) if extra else self.reduce_params

    def _follow_trainable(self) -> None:
        """θ, the shared parameters, ``params`` and ``reduce_params`` again from the tensors given,
        after some tensor's ``requires_grad`` changed since the last step, and what was derived from
        them forgotten.

        Why: they were the given tensors that required grad when the engine was made. A shared layer
        unfrozen later (a fine-tuning schedule) was then a leaf outside θ: it took the heads' Σ ∇Lᵢ
        and counted in no Gramian (0.24 off UPGrad's update on its weight); one frozen later made the
        J route raise torch's error and the no-J route write it a zero gradient, which AdamW's decay
        still moved."""
        shared, last, params, reduce = self._given
        self.shared = [p for p in shared if p.requires_grad]
        _check_leaves(self.shared)
        self.theta = self.shared if last is None else [p for p in last if p.requires_grad]
        self.reduce_params = [p for p in reduce if p.requires_grad]
        self._declared = self._params = None if params is None else [p for p in params if p.requires_grad]
        self._private_leaves, self._reached_numel = None, 0
        self._kept_jacobian = None
        for derived in ("_shared_id_cache", "_hook_cache", "_rows"):
            self.__dict__.pop(derived, None)
        self._trains = [p.requires_grad for p in self._watched]

    def _held_hooks(self) -> list[tuple[Tensor, dict[Any, Any], Tensor | None, int]]:
        """The post-accumulate-grad hooks of the tensors the engine knows, taken out of them for the
        step, with each tensor's ``.grad`` and its version as they were (empty where none has a hook).

        Why: a step may take several passes through the graph and write θ's update itself; autograd
        would run a hook on every pass that reaches its tensor (T times, each with one task's
        gradient) and none on the writes, so a hook that takes the optimiser's step left θ untrained
        under a Gramian method and stepped a head once per pass on another route. The hooks' dict
        is emptied, not dropped: autograd and FSDP read that same dict."""
        held: list[tuple[Tensor, dict[Any, Any], Tensor | None, int]] = []
        hooked = [t for t in self._hook_tensors() if t._post_accumulate_grad_hooks]  # usually none: one pass
        if hooked:
            _hold(hooked, held)
        return held

    def _hold_more(self, tensors: list[Tensor]) -> None:
        """Take out the hooks of ``tensors`` too, for this step (leaves a walk of its graph found)."""
        held = getattr(self, "_held", None)
        if held is not None:
            known = {id(entry[0]) for entry in held}
            _hold([t for t in tensors if id(t) not in known], held)

    def _hook_tensors(self) -> list[Tensor]:
        """θ, ``params``, ``reduce_params``, the method's own parameters and the leaves the fused
        passes found, each once; kept while those leaves are the same, once the method is set up
        (its parameters are made then)."""
        found = self._private_leaves
        cached = self.__dict__.get("_hook_cache")
        if cached is not None and cached[0] is found:
            return cached[1]
        tensors = _unique([*self.shared, *self.theta, *self.reduce_params, *(self._params or ()),
                           *(p for p in self.method.parameters() if p.requires_grad), *(found or ())])
        if self.method.is_set_up:
            self._hook_cache = (found, tensors)
        return tensors

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """The method's learnable parameters (uncertainty log-variances, …): give them to the optimizer."""
        return self.method.parameters()

    def state_dict(self) -> dict[str, Any]:
        cached = None if self._cached is None else {"tasks": list(self._cached[0]), "w": self._cached[1]}
        # The routes chosen on the first steps (timed loop vs batched J, J vs no-J Gramian) are part of
        # the state: a resumed engine that chose again could pick another route, which rounds differently.
        routes = {"jacobian": self.jacobian.state_dict(), "feature_jacobian": self.feature_jacobian.state_dict(),
                  "gramian": self.gramian_route}
        return {"index": self.index, "cached": cached, "method": self.method.state_dict(), "routes": routes}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.index = int(state["index"])
        c = state.get("cached")
        self._cached = None if c is None else (tuple(c["tasks"]), c["w"])
        self.method.load_state_dict(state["method"])
        routes = state.get("routes") or {}  # checkpoints written before the routes were saved have none
        for computer, key in ((self.jacobian, "jacobian"), (self.feature_jacobian, "feature_jacobian")):
            if key in routes:
                computer.load_state_dict(routes[key])
        if self.gramian_route == "auto" and routes.get("gramian") in ("jacobian", "autogram"):
            self.gramian_route = routes["gramian"]

    # ------------------------------------------------------------------------------ the step
    def backward(self, losses: Mapping[str, Tensor | None], *, features: Iterable[Tensor] | None = None,
                 epoch: int = 0, extra_loss: Tensor | None = None, scale: float = 1.0,
                 diagnose: bool = False, lookahead: Outer | None = None, report_gramian: bool = False) -> StepReport:
        """Accumulate the update into ``.grad``, advance the step counter and report the step.

        ``losses`` maps every task to its scalar loss, or ``None`` when the task has no labelled
        sample this step (it gets weight 0 and no gradient); a loss that is not a scalar tensor with
        a gradient is refused with an error naming the task, before anything is written.
        ``features`` are the shared representation tensors (needed by ``compare="features"``). ``extra_loss`` (e.g. a
        soft-sharing penalty) is added with weight 1. ``scale`` multiplies the total (a gradient
        scaler's loss scale, or gradient accumulation) without changing the weights: per-task
        gradients are taken of the scaled losses (so fp16 gradients do not underflow) and
        unscaled before the method sees them; if they are not finite (a scaler overflow) the
        method is skipped this step and the non-finite update is left for the scaler to discard.
        ``diagnose`` forces the task Jacobian on θ this step (its Gramian is in the report, and
        reused for the update, so the step costs what a Gramian method's step costs).
        ``report_gramian``: G is formed whenever J on θ is (a Jacobian method's G is otherwise formed
        only if the method reads it), for a caller that reads ``report.gramian`` every step; unlike
        ``diagnose`` it computes no J that the method does not need.

        A post-accumulate-grad hook (``p.register_post_accumulate_grad_hook``: torch's recipe for the
        optimiser's step in the backward) runs once on every parameter the step gives a gradient,
        after the whole update is written (and averaged over ranks), as after one ``backward()``;
        on the parameters the engine knows: θ, ``params``, ``reduce_params``, the method's own.
        """
        if self.comm is None and self._losses_only(diagnose, extra_loss):  # one backward: autograd runs each hook once
            return self._backward(losses, features, epoch, extra_loss, scale, diagnose, lookahead, report_gramian)
        if [p.requires_grad for p in self._watched] != self._trains:
            self._follow_trainable()  # before the hooks are held: a layer unfrozen now has its hooks too
        self._held = self._held_hooks()
        try:
            report = self._backward(losses, features, epoch, extra_loss, scale, diagnose, lookahead, report_gramian)
        except BaseException:
            held, self._held = self._held, None
            _release_hooks(held, run=False)
            raise
        held, self._held = self._held, None
        if held:
            _release_hooks(held, run=True)
        return report

    def _backward(self, losses: Mapping[str, Tensor | None], features: Iterable[Tensor] | None, epoch: int,
                  extra_loss: Tensor | None, scale: float, diagnose: bool, lookahead: Outer | None,
                  report_gramian: bool) -> StepReport:
        self._no_j = False
        self._private = None
        self._theta_reached: set[int] | None = None  # θ's tensors this step's passes reached (see _add_flat_grad)
        if not self.method.is_set_up:
            self.method.setup(list(losses))
        active = tuple(t for t, v in losses.items() if v is not None)
        parted = self.batch_parts > 1  # a loss per part of the batch: its shape is checked with the parts
        for t in active:  # one clear error here, not autograd's (or none: a constant loss took a weight silently)
            loss = losses[t]
            if (not isinstance(loss, Tensor) or (loss.dim() and not parted) or not loss.requires_grad
                    or not loss.dtype.is_floating_point):
                raise _bad_loss(t, loss)
        index = self.index  # counted once the losses are known good: a refused step changes nothing
        self.index += 1
        if not active:
            if extra_loss is not None:
                (extra_loss * scale).backward()
            if self.comm is not None:
                self.comm.mean_grads_(self._reduced())
            return StepReport(index, (), torch.zeros(0), {t: 0.0 for t in losses}, self.compare, self.heads)
        if self._losses_only(diagnose, extra_loss):
            return self._losses_step(losses, active, index, epoch, scale)
        if self._plain_gramian and not diagnose and extra_loss is None and self.gramian_route == "jacobian":
            report = self._gramian_step(losses, active, index, epoch, scale)
            if report is not None:
                return report
        parts: list[Tensor] = [losses[t] for t in active]  # type: ignore[misc]
        part_losses = self._part_losses(active, parts) if self.batch_parts > 1 else None
        if part_losses is not None:
            parts = [p.mean() for p in parts]  # the update is that of the whole batch's loss
        vec = torch.stack(parts)
        detached = vec.detach() if self.comm is None else self.comm.mean_(vec.detach().clone())
        step = Step(tasks=active, losses=detached, index=index, seed=self.seed, epoch=epoch)
        if getattr(self.method, "lookahead", False):
            step.lookahead = self._lookahead(active, lookahead)
        reuse = self._cached is not None and self._cached[0] == active and index % self.every != 0
        on_theta = self.compare in ("shared", "last_shared") and not reuse
        jacobian = theta_gramian = row_norms = None
        part_gramians = None
        deferred = False
        if part_losses is not None and not reuse:
            # one Jacobian per part; the update's J (of the mean loss) is their mean
            part_j = [self._jacobian(self.jacobian, [p[a] for p in part_losses], self.theta, scale)
                      for a in range(self.batch_parts)]
            part_gramians = self._part_gramians(part_j)
            theta_gramian = part_gramians.sum(dim=(0, 1)) / self.batch_parts**2  # G of the mean: bilinear
            jacobian = part_j[0]
            for other in part_j[1:]:  # in place: J is the largest tensor of the step
                jacobian.add_(other)
            jacobian.div_(self.batch_parts)
            del part_j
        elif on_theta or diagnose or self.task_clip is not None:
            if self.gramian_route != "jacobian" and self.method.needs == "gramian" and self._route(parts) == "autogram":
                theta_gramian = self._no_j_gramian(parts, scale)
            if theta_gramian is None:
                if on_theta and extra_loss is None and not self.lookahead and self._can_fuse():
                    jacobian = self._fused_jacobian(parts, scale)
                else:
                    jacobian = self._jacobian(self.jacobian, parts, self.theta, scale)
                # a Jacobian method's G is formed only if something reads it (see Step.defer_gramian)
                deferred = (self.method.needs == "jacobian" and on_theta and not (diagnose or report_gramian)
                            and self.task_clip is None)
                theta_gramian = None if deferred else self._theta_gramian(jacobian)
        clip = self._clip_factors(theta_gramian)
        feature_jacobian: list[Tensor] | None = None
        fallback = None
        if reuse:
            update = Update(self._cached[1])  # type: ignore[index]
        else:
            if self.compare == "features":
                zs = [z for z in (features or []) if z.requires_grad]
                if not zs:
                    raise InvalidParameterError(f"'{self.name}' compares gradients on the features, but the step "
                                                "gave no shared representation (pass features=[z])")
                jz = self._jacobian(self.feature_jacobian, parts, zs, scale)
                feature_jacobian = [jz, *zs]
                step.gramian = gramian(jz)
                if self.comm is not None:  # shards are disjoint: cross-rank blocks of J_z are zero
                    step.gramian = self.comm.sum_(step.gramian) / self.comm.world_size ** 2
            elif on_theta:
                if deferred:
                    j = jacobian
                    step.defer_gramian(lambda: self._theta_gramian(j))  # type: ignore[arg-type]
                else:
                    step.gramian = theta_gramian
                step.jacobian = jacobian if self.method.needs == "jacobian" else None
                if step.jacobian is not None:  # per-group methods split J's columns by these
                    step.param_shapes = tuple(p.shape for p in self.theta)
                step.part_gramians = part_gramians
            if clip is not None and step.gramian is not None:
                # per-task clipping acts on the gradients the method sees, as if each gᵢ were cᵢ gᵢ
                step.gramian = clip[:, None] * step.gramian * clip[None, :]
                step.jacobian = None if step.jacobian is None else clip[:, None] * step.jacobian
                if step.part_gramians is not None:
                    step.part_gramians = clip[:, None] * step.part_gramians * clip[None, :]
            # finite iff its float64 sum is (one reduction, where isfinite + all take two and a bool); with
            # G deferred, the same of the rows' norms (G's diagonal, one pass over J, a third of G's cost)
            row_norms = torch.linalg.vector_norm(jacobian, dim=1) if deferred else None  # type: ignore[arg-type]
            checked = row_norms if deferred else step.gramian
            if checked is not None and not math.isfinite(checked.sum(dtype=torch.float64)):
                update, fallback = Update(torch.ones_like(vec)), "non-finite task gradients: equal weights"
            else:
                update = self.method(step)
            if deferred:
                theta_gramian = step.formed_gramian  # G when the method read it
            if update.weights.shape != (len(active),):
                raise InvalidParameterError(f"method '{self.name}' returned weights of shape "
                                            f"{tuple(update.weights.shape)}; expected ({len(active)},)")
            if self.every > 1:
                self._cached = (active, update.weights.detach())
        applied = update.weights if clip is None else update.weights * clip
        self._apply(vec, applied, update, jacobian, feature_jacobian, extra_loss, scale,
                    clip, bool(update.direction is not None and step.jacobian is not None))
        weights = {t: 0.0 for t in losses}
        weights.update(zip(active, applied.detach().tolist(), strict=True))
        return StepReport(index, active, detached, weights, self.compare, self.heads, theta_gramian,
                          None if feature_jacobian is None else step.gramian, clip, reuse, fallback,
                          row_norms if theta_gramian is None else None)

    @property
    def _plain_gramian(self) -> bool:
        """A Gramian method on every shared parameter, one rank, unweighted heads and nothing else:
        the step :meth:`_gramian_step` takes (while the J route is the step's)."""
        return (self.method.needs == "gramian" and self.compare == "shared" and self.heads == "unweighted"
                and self.every == 1 and self.batch_parts == 1 and not self.lookahead and self.task_clip is None
                and self.comm is None)

    def _gramian_step(self, losses: Mapping[str, Tensor | None], active: tuple[str, ...], index: int, epoch: int,
                      scale: float) -> StepReport | None:
        """The step of a plain Gramian method on the J route, where autograd can write J itself
        (:func:`~polytask.engine.jacobian.accumulates`): T passes accumulating into J's rows and the
        heads' ``.grad``, G, the method, d = Jᵀw on θ; None (nothing done) where it cannot.

        Why: on a small model a step's passes cost a few hundred microseconds, and the general
        step's branches, the per-task gradients it hands around and their copies into J were a
        fifth of the step on top of them. The operations are the general step's on the fused
        route (same passes, G, weights and d), bit for bit; the heads get Σᵢ ∇Lᵢ summed by autograd
        in task order, as the general step sums them."""
        if not self.jacobian.loops(self.theta[0]):
            return None
        parts: list[Tensor] = [losses[t] for t in active]  # type: ignore[misc]
        private = self._private_leaves if self._private_leaves is not None else self._walk_private(parts)
        jacobian, _ = self._jacobian_storage(len(parts))
        if not accumulates((*self.theta, *private), jacobian):
            return None
        vec = torch.stack(parts)
        detached = vec.detach()
        self._accumulate_jacobian(jacobian, parts, private, scale)
        g, values = host_gramian(jacobian)  # values: finite, else None
        finite = values is not None or math.isfinite(g.sum(dtype=torch.float64))
        fallback = None
        penalty = None
        if not finite:
            applied, fallback = torch.ones_like(vec), "non-finite task gradients: equal weights"
        else:
            step = Step(tasks=active, losses=detached, index=index, seed=self.seed, epoch=epoch)
            if values is None:
                step.gramian = g
            else:
                step.give_gramian(g, values)
            update = self.method(step)
            applied, penalty = update.weights, update.penalty
            if applied.shape != (len(active),):
                raise InvalidParameterError(f"method '{self.name}' returned weights of shape "
                                            f"{tuple(applied.shape)}; expected ({len(active)},)")
        direction = applied.detach() @ jacobian
        self._add_flat_grad(direction * scale if scale != 1.0 else direction, self._theta_reached)
        if penalty is not None:  # the method's own parameters (log-variances, …), never θ
            reached = self._leaves(penalty, self.theta)
            if reached:
                torch.autograd.backward(penalty * scale, inputs=reached)
        if len(active) == len(losses):
            weights = dict(zip(active, applied.tolist(), strict=True))
        else:
            weights = dict.fromkeys(losses, 0.0)
            weights.update(zip(active, applied.tolist(), strict=True))
        return StepReport(index, active, detached, weights, self.compare, self.heads, g, fallback=fallback)

    @property
    def _weights_losses(self) -> bool:
        """A plain loss-weighting method (no batch parts, no outer batch): its step needs no gradient
        but the one backward of Σ wᵢLᵢ."""
        return self.method.needs == "losses" and self.batch_parts == 1 and not self.lookahead

    def _losses_only(self, diagnose: bool, extra_loss: Tensor | None) -> bool:
        """Whether the step is :meth:`_losses_step`'s: one backward of Σ wᵢLᵢ."""
        return self._weights_losses and not diagnose and extra_loss is None and self.task_clip is None

    def _losses_step(self, losses: Mapping[str, Tensor | None], active: tuple[str, ...], index: int, epoch: int,
                     scale: float) -> StepReport:
        """The step of a loss-weighting method: the general step's operations on this route, without
        its branches. Why: on a small model (an RL or tabular network) a step's gradients cost a
        millisecond or less, and the general step's Python was a twentieth of it."""
        vec = torch.stack([losses[t] for t in active])  # type: ignore[misc]
        detached = vec.detach() if self.comm is None else self.comm.mean_(vec.detach().clone())
        key = (active, vec.dtype, vec.device) if self._constant_weights else None
        known = None if key is None else self._constant.get(key)
        keyed, hosting = (False, False) if key is not None else _spoken(type(self.method))
        if (keyed or hosting) and not self._unpatched:
            keyed = hosting = False
        if keyed:
            since = self.method.weights_key(active)  # the weights stay those of the last step with this key
            if since is not None:
                key = (active, vec.dtype, vec.device, since)
                last = self._reused
                known = last[1] if last is not None and last[0] == key else None
        own: tuple[tuple[Tensor, Tensor], ...] = ()
        hosted = None
        if known is not None:
            applied, values = known
            penalty = None
        else:
            step = Step.losses_only(active, detached, index, self.seed, epoch)
            hosted = self.method.host_update(step) if hosting else None
            given = None
            if hosted is not None:
                applied, penalty, own, given = hosted.weights, None, hosted.gradients, hosted.values
            else:
                update = self.method(step)
                applied, penalty = update.weights, update.penalty
            if applied.shape != (len(active),) or (given is not None and len(given) != len(active)):
                raise InvalidParameterError(
                    f"method '{self.name}' returned weights of shape {tuple(applied.shape)}"
                    f"{'' if given is None else f' and {len(given)} values'}; expected ({len(active)},)")
            if applied.dtype != vec.dtype:
                applied, given = applied.to(vec.dtype), None
            # tolist reads through autograd: no detach needed
            values = applied.tolist() if given is None else list(given)
            if key is not None and len(key) == 4:  # one entry: the key changes as training goes on
                self._reused = (key, (applied.detach(), values))
            elif key is not None:
                self._constant[key] = (applied.detach(), values)
        if hosted is not None or (penalty is None and not applied.requires_grad):  # constants: they seed the
            # losses' backward, and a method's own parameters (host_update) are outputs seeded with their gradients.
            # The losses' seed must be this step's own tensor: the backward may adopt (a row of) it as a leaf's
            # .grad (a loss that is a leaf, or a view of one), which later accumulation and zero_grad write
            # into. A cached answer or a method's weights may be kept (the engine's caches, a method's
            # buffers), so they are copied; HostUpdate.weights are the step's own by contract.
            seed = applied if hosted is not None or scale != 1.0 else applied.clone()
            outputs, seeds = (vec, *(p for p, _ in own)), (seed, *(g for _, g in own))
            accumulate_seeded(outputs, seeds if scale == 1.0 else [seed * scale for seed in seeds])
        else:  # weights that learn (uncertainty's update): their gradient comes through the product
            total = _weighted_sum(update.weights, vec)
            if penalty is not None:
                total = total + penalty
            accumulate(total * scale if scale != 1.0 else total)
        if self.comm is not None:
            self.comm.mean_grads_(self._reduced())
        if len(active) == len(losses):  # every task active, in the losses' order (active is drawn from it)
            weights = dict(zip(active, values))
        else:
            weights = dict.fromkeys(losses, 0.0)
            weights.update(zip(active, values))
        return StepReport(index, active, detached, weights, self.compare, self.heads)

    @property
    def _constant_weights(self) -> bool:
        """Whether the method's answer may be reused per task set: its class declares
        ``constant_weights`` and the instance has no patched ``weights``/``update``/``forward`` and no
        forward hooks (all of which the reuse would skip)."""
        return self.method.constant_weights and self._unpatched

    @property
    def _unpatched(self) -> bool:
        """Whether the method instance has no patched ``weights``/``update``/``forward``/``weights_key``
        and no forward hooks, all of which reusing its answer would skip."""
        method = self.method
        return (not {"weights", "update", "forward", "weights_key", "host_update"} & vars(method).keys()
                and not method._forward_hooks and not method._forward_pre_hooks)

    def _lookahead(self, active: tuple[str, ...], outer: Outer | None) -> Callable[..., tuple[Tensor, Tensor]]:
        """``Step.lookahead`` from a closure over the outer batch: θ is replaced by θ + δ (new
        leaves, not an in-place change, so the inner graph stays valid) and the gradient taken there.
        ``batch="inner"`` evaluates the step's own (inner) batch instead, for methods that take
        several virtual steps on it (FORUM); the closure must then accept that keyword."""
        if outer is None:
            raise InvalidParameterError(
                f"'{self.name}' evaluates an outer batch at displaced parameters: pass lookahead=, a function that maps "
                "{id(parameter): replacement} to the tasks' losses on the outer batch (the Trainer builds it from half "
                "of each batch)")

        def evaluate(delta: Tensor, weights: Tensor, batch: str = "outer") -> tuple[Tensor, Tensor]:
            if batch not in ("outer", "inner"):
                raise InvalidParameterError(f"Step.lookahead evaluates batch 'outer' or 'inner'; found {batch!r}")
            if batch == "inner" and "batch" not in inspect.signature(outer).parameters:
                raise InvalidParameterError(
                    f"'{self.name}' also takes virtual steps on the inner batch: the lookahead= closure must accept "
                    "batch='inner' (and evaluate the step's own batch then), as the Trainer's does")
            moved, offset = {}, 0
            for p in self.theta:
                moved[id(p)] = (p.detach() + delta[offset:offset + p.numel()].view_as(p).to(p.dtype)).requires_grad_(True)
                offset += p.numel()
            out = outer(moved) if batch == "outer" else outer(moved, batch="inner")
            missing = [t for t in active if out.get(t) is None]
            if missing:
                raise InvalidParameterError(f"the {batch} batch of '{self.name}' has no loss for task(s) {missing}")
            values = torch.stack([out[t] for t in active])  # type: ignore[misc]
            rows = weights.reshape(-1, len(active)).to(values)  # (K, T): one gradient per row, one forward
            flats = []  # no rows (weights of shape (0, T)): the losses only, no backward
            for k, row in enumerate(rows):
                grads = torch.autograd.grad((row * values).sum(), list(moved.values()), allow_unused=True,
                                            retain_graph=k < len(rows) - 1)
                flats.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1)
                                        for p, g in zip(self.theta, grads, strict=True)]))
            flat = (torch.stack(flats) if flats else values.new_zeros(0, offset)) if weights.dim() == 2 else flats[0]
            if self.comm is not None:
                self.comm.mean_(flat)
                values = self.comm.mean_(values.detach().clone())
            return values.detach(), flat
        return evaluate

    def _part_losses(self, active: tuple[str, ...], parts: list[Tensor]) -> list[Tensor]:
        k = self.batch_parts
        for t, loss in zip(active, parts, strict=True):
            if loss.shape != (k,):
                raise InvalidParameterError(
                    f"'{self.name}' needs each task's loss on {k} independent parts of the step's batch: losses[{t!r}] "
                    f"must be the {k} part losses stacked, shape ({k},); found shape {tuple(loss.shape)}. The Trainer "
                    "splits each batch for such methods; in a plain loop pass torch.stack([loss_on_part_1, ...])")
        return parts

    def _jacobian(self, computer: JacobianComputer, parts: list[Tensor], inputs: list[Tensor], scale: float) -> Tensor:
        j = computer([p * scale for p in parts] if scale != 1.0 else parts, inputs)
        if scale != 1.0:
            j.div_(scale)
        if self.comm is not None and computer is self.jacobian:
            self.comm.mean_(j)
        return j

    def _theta_gramian(self, jacobian: Tensor | JacobianPieces) -> Tensor:
        """G on θ from the step's J (a sharded engine sums the ranks' column blocks here)."""
        return jacobian.gramian() if isinstance(jacobian, JacobianPieces) else gramian(jacobian)

    def _part_gramians(self, part_jacobians: list[Tensor]) -> Tensor:
        """The cross Gramians Gₐᵦ = Jₐ Jᵦᵀ of the batch parts' Jacobians (k×k×T×T)."""
        return torch.stack([torch.stack([cross_gramian(a, b) for b in part_jacobians]) for a in part_jacobians])

    def _apply(self, vec: Tensor, applied: Tensor, update: Update, jacobian: Tensor | None,
               feature_jacobian: list[Tensor] | None, extra_loss: Tensor | None, scale: float,
               clip: Tensor | None, use_direction: bool) -> None:
        """Write the update into ``.grad``: θ gets Σ wᵢ gᵢ (or the direction), each head its share."""
        head = applied if self.heads == "weighted" else (clip if clip is not None else torch.ones_like(applied))
        split = self.heads == "unweighted"
        if extra_loss is not None:
            # a regulariser on the parameters themselves (soft sharing), not a task: its gradient
            # is added as is, wherever it lands (shared parameters included)
            self._hold_more(self._leaves(extra_loss, []))  # its leaves' hooks run once, at the step's end
            (extra_loss * scale).backward(retain_graph=True)
        private, self._private = self._private, None
        if private is not None:
            direction = update.direction if use_direction else transpose_times(jacobian, applied.detach())  # type: ignore[arg-type]
            # the gradients may be views of what is passed: the method's own direction is copied
            self._add_flat_grad(direction * scale if scale != 1.0 or use_direction else direction,
                                self._theta_reached)
            self._add_private_grads(private, head.detach())
            if update.penalty is not None:  # the method's own parameters (log-variances, …), never θ
                reached = self._leaves(update.penalty, self.theta)
                if reached:
                    torch.autograd.backward(update.penalty * scale, inputs=reached)
            return
        shared_total = _weighted_sum(applied, vec)
        # what the task-specific parameters back-propagate (the method's penalty lands there too)
        head_total = shared_total if not split else (head.detach() * vec).sum()
        if update.penalty is not None:
            head_total = head_total + update.penalty
        no_j, self._no_j = self._no_j, False
        if (jacobian is not None or no_j) and self.theta:
            # J is already materialised (or, without J, each layer's per-task output gradients are
            # held): put d = Jᵀ w (or the method's direction) on θ directly and back-propagate only
            # into the other parameters, skipping a second pass through θ.
            direction = (update.direction if use_direction else applied.detach() @ jacobian if jacobian is not None
                         else self.autogram.direction(applied.detach()))
            seen: list[Tensor] = []
            reached = self._leaves(head_total, self.theta, excluded=seen)
            self._hold_more(reached)
            # the gradients may be views of what is passed: the method's own direction is copied
            ids = {id(p) for p in seen}
            self._add_flat_grad(direction * scale if scale != 1.0 or use_direction else direction,
                                {k for k, p in enumerate(self.theta) if id(p) in ids})
            if split:
                theta_below = [p for p in reached if id(p) in self._shared_ids]  # last_shared: the layers below
                private = [p for p in reached if id(p) not in self._shared_ids]
                if private:
                    torch.autograd.backward(head_total * scale, inputs=private, retain_graph=bool(theta_below))
                if theta_below:
                    torch.autograd.backward(shared_total * scale, inputs=theta_below)
            elif reached:
                torch.autograd.backward(head_total * scale, inputs=reached)
            if self.comm is not None:
                theta = {id(p) for p in self.theta}
                self.comm.mean_grads_([p for p in self._reduced() if id(p) not in theta])
            return
        if not split:
            accumulate(head_total * scale if scale != 1.0 else head_total)
        elif feature_jacobian is not None:
            # heads: Σ ∇Lᵢ; θ: back-propagate Σ wᵢ ∂Lᵢ/∂z from z, the gradients already computed
            jz, *zs = feature_jacobian
            above = self._leaves(head_total, [], stop=zs)  # what the losses reach without passing z
            self._hold_more(above)
            private = [p for p in above if id(p) not in self._shared_ids]
            # a shared tensor the heads read too (an embedding tied to the output layer): its gradient
            # comes from Σ wᵢLᵢ along every path (z's included), not from z alone, which missed the heads'
            tied = [p for p in above if id(p) in self._shared_ids]
            if private:
                torch.autograd.backward(head_total * scale, inputs=private, retain_graph=True)
            if tied:
                torch.autograd.backward(shared_total * scale, inputs=tied, retain_graph=True)
            flat = (applied.detach().to(jz.dtype) @ jz) * scale
            grads, offset = [], 0
            for z in zs:
                grads.append(flat[offset:offset + z.numel()].view_as(z).to(z.dtype))
                offset += z.numel()
            below = self._leaves(zs, tied) if tied else None  # the tied tensors have their gradient
            if below is None or below:
                torch.autograd.backward(zs, grad_tensors=grads, inputs=below)
        else:  # weights reused between recomputations: no J this step, split the two parts
            reached = self._leaves(shared_total, [])
            self._hold_more(reached)
            private = [p for p in reached if id(p) not in self._shared_ids]
            shared = [p for p in reached if id(p) in self._shared_ids]
            if private:
                torch.autograd.backward(head_total * scale, inputs=private, retain_graph=bool(shared))
            if shared:
                torch.autograd.backward(shared_total * scale, inputs=shared)
        if self.comm is not None:
            self.comm.mean_grads_(self._reduced())

    def _can_fuse(self) -> bool:
        """Whether this step's task passes can also give the heads' gradients (see ``_fused_jacobian``)."""
        if self.compare != "shared" or self.comm is not None:
            return False
        return self.jacobian.loops(self.theta[0]) or self.jacobian.chosen == "batched"

    def _fused_jacobian(self, parts: list[Tensor], scale: float) -> Tensor:
        """J on θ from T per-task passes that also return each task's gradients on the leaves
        outside θ it reaches (its head, stem, task-specific gates), kept for ``_apply``.

        Why: the J route otherwise needs one more backward after the method, of Σ wᵢLᵢ into the
        heads. On a small model every backward call costs a fixed few hundred microseconds
        (the autograd engine's own work), so that extra call was a third of a step; here the heads'
        gradients come out of the passes that run through them anyway, and wᵢ is applied to them
        once the method has answered. The leaves are those of this step's graph (found by walking
        it once), so a task that reaches a new parameter gets its gradient.

        With ``jacobian: batched`` the passes are one vmapped backward per chunk of tasks, which
        gives every task's gradient on every such leaf (zero outside the task's own head): it is
        fused only while those T×(leaves) gradients are no larger than J itself, else the heads
        get their own backward as before.
        """
        private = self._private_leaves if self._private_leaves is not None else self._walk_private(parts)
        if not self.jacobian.loops(self.theta[0]):
            fused = self._fused_batched(parts, private, scale)
            if fused is not None:
                return fused
            return self._jacobian(self.jacobian, parts, self.theta, scale)
        inputs, n = (*self.theta, *private), len(self.theta)
        jacobian, _ = self._jacobian_storage(len(parts))
        if self.heads == "unweighted" and self.task_clip is None and accumulates(inputs, jacobian):
            # every task's head gradient enters .grad with coefficient 1: autograd sums them itself
            self._accumulate_jacobian(jacobian, parts, private, scale)
            self._private = (private, None, False)
            return jacobian
        grads_by_task: list[tuple[Tensor | None, ...]] = []
        last = len(parts) - 1
        reached: set[int] = set()
        for i, loss in enumerate(parts):
            # the last pass frees the graph, as a plain backward would (the penalty, if any, has its own)
            grads = loss_grads(loss * scale if scale != 1.0 else loss, inputs, retain_graph=i < last)
            torch.cat([dense(g).reshape(-1) if g is not None else p.new_zeros(p.numel())
                       for g, p in zip(grads[:n], self.theta, strict=True)], out=jacobian[i])
            reached.update(k for k, g in enumerate(grads[:n]) if g is not None)
            grads_by_task.append(grads[n:])
        self._theta_reached = reached
        if scale != 1.0:
            jacobian.div_(scale)  # the private gradients stay scaled: they are written as they are
        self._private = (private, grads_by_task, False)
        return jacobian

    def _accumulate_jacobian(self, jacobian: Tensor, parts: list[Tensor], private: list[Tensor], scale: float) -> None:
        """J's rows and the leaves outside θ their Σᵢ ∇Lᵢ, by passes that accumulate
        (:func:`~polytask.engine.jacobian.accumulate_rows`); the last pass frees the graph. The θ
        tensors some pass reached go to ``_theta_reached`` (a pass that reaches one adds into its
        row's view, and the views of one tensor share a version counter of their own, which moves)."""
        jacobian.zero_()
        views = self._row_views()[:len(parts)]
        before = [v._version for v in views[0]]  # a tensor's views share one counter (see row_views)
        accumulate_rows([loss * scale for loss in parts] if scale != 1.0 else parts, self.theta,
                        views, private, free_graph=True)
        self._theta_reached = {k for k, (v, was) in enumerate(zip(views[0], before, strict=True)) if v._version != was}
        if scale != 1.0:
            jacobian.div_(scale)  # the private gradients stay scaled, as the copying passes leave them

    def _walk_private(self, parts: list[Tensor]) -> list[Tensor]:
        """The leaves outside θ that this step's losses reach, by walking the graph; on the first walk,
        when ``params`` were given and hold every one of them, ``params`` outside θ from then on."""
        found = self._leaves(parts, self.theta)
        declared, self._declared = self._declared, None  # decided once: the walk below is not repeated
        if declared is not None:
            ids = {id(p) for p in declared}
            if all(id(p) in ids for p in found):
                theta = {id(p) for p in self.theta}
                self._private_leaves = [p for p in declared if id(p) not in theta]
                # what the losses reach of them, for the batched passes' size test (unreached ones get no gradient)
                self._reached_numel = sum(p.numel() for p in found)
                return self._private_leaves
        self._hold_more(found)  # leaves the engine was not told of (no ``params``): their hooks too
        return found

    def _jacobian_storage(self, rows: int) -> tuple[Tensor, list[int]]:
        """Storage for this step's J on θ (``rows`` tasks), kept from the last step when it is as
        wide and of the same dtype and device, with at least ``rows`` rows (its first ``rows`` rows
        are J then), and the sizes of θ's tensors.

        Why: a fresh J is memory the kernel maps and faults in page by page (glibc maps every
        allocation above 32 MB afresh and unmaps it when freed). Writing the 10 rows of the
        benchmark MLP's J (70 MB) took 30 ms into a fresh tensor and 8 ms into a kept one, a
        tenth of the whole step. The engine holds J between steps instead (no more memory at the
        step's peak, J-sized in between; ``release_memory`` frees it, ``kept_bytes`` reports it). A
        method must copy what it keeps of ``step.jacobian``: the next step writes over it."""
        if not self.theta:
            return _empty_jacobian(rows, self.theta)  # its error: no shared parameter
        sizes = [p.numel() for p in self.theta]
        width, like, dtype = sum(sizes), self.theta[0], self._theta_dtype
        kept = self._kept_jacobian
        if (kept is None or kept.shape[0] < rows or kept.shape[1] != width or kept.dtype != dtype
                or kept.device != like.device):
            self._kept_jacobian = None  # the old storage goes before the new one is made
            kept = self._kept_jacobian = torch.empty(rows, width, dtype=dtype, device=like.device)
        return kept[:rows], sizes

    def _row_views(self) -> list[list[Tensor]]:
        """Views of each row of the kept J shaped as θ's tensors, made once per storage."""
        kept, cached = self._kept_jacobian, self.__dict__.get("_rows")
        if cached is None or cached[0] is not kept:
            cached = self._rows = (kept, row_views(kept, [p.shape for p in self.theta]))  # type: ignore[arg-type]
        return cached[1]

    @property
    def kept_bytes(self) -> int:
        """Bytes the engine holds between steps (the kept storage of J; see ``_jacobian_storage``)."""
        kept = self._kept_jacobian
        return 0 if kept is None else kept.numel() * kept.element_size()

    def release_memory(self) -> None:
        """Free what the engine keeps between steps (J's storage); the next step makes it anew."""
        self._kept_jacobian = None
        self.__dict__.pop("_rows", None)  # views of it

    def _fused_batched(self, parts: list[Tensor], private: list[Tensor], scale: float) -> Tensor | None:
        """``_fused_jacobian`` by vmapped backward passes, ``chunk_size`` tasks each; None (nothing
        run) when the leaves outside θ hold more values than θ, whose T-fold gradients would
        outgrow J. The kept gradients are (start row, the chunk's gradients, rows first). For a
        method that reads only G, J is left in the passes' own blocks (:class:`JacobianPieces`),
        not copied into one T×P tensor."""
        n_private = (self._reached_numel if private is self._private_leaves else sum(p.numel() for p in private))
        if n_private > sum(p.numel() for p in self.theta):
            return None
        inputs, n, t = [*self.theta, *private], len(self.theta), len(parts)
        pieces: list[tuple[int, int, list[Tensor | None]]] | None = [] if self.method.needs == "gramian" else None
        jacobian, sizes = self._jacobian_storage(t) if pieces is None else (None, [p.numel() for p in self.theta])
        vec = torch.stack(parts)
        if scale != 1.0:
            vec = vec * scale
        chunk = t if self.jacobian.chunk_size is None else min(self.jacobian.chunk_size, t)
        blocks: list[tuple[int, tuple[Tensor | None, ...]]] = []
        eye = self._eye(t, vec)
        reached: set[int] = set()
        for start in range(0, t, chunk):
            rows = min(chunk, t - start)
            selector = eye[start:start + rows]
            grads = batched_grads(vec, inputs, selector, retain_graph=start + rows < t)
            reached.update(k for k, g in enumerate(grads[:n]) if g is not None)
            if pieces is not None and scale != 1.0:
                grads = _unaliased(grads)  # J's blocks are unscaled in place, the heads' kept scaled
            if pieces is None:
                _write_row(jacobian[start:start + rows], grads[:n], sizes)  # type: ignore[index]
            else:
                pieces.append((start, rows, [None if g is None else g.reshape(rows, -1) for g in grads[:n]]))
            blocks.append((start, grads[n:]))
        result = jacobian if pieces is None else JacobianPieces(pieces, t, sizes, self.theta[0], self._theta_dtype)
        if scale != 1.0:
            result.div_(scale)  # type: ignore[union-attr]
        self._theta_reached = reached
        self._private = (private, blocks, True)
        return result  # type: ignore[return-value]

    @staticmethod
    def _add_private_grads(private: tuple[list[Tensor], list[Any] | None, bool], head: Tensor) -> None:
        """``.grad`` of each leaf outside θ += Σᵢ headᵢ · (task i's gradient there).

        The gradients are per task (a tuple per loop pass) or per chunk of tasks (``(start, tuple)``
        from the vmapped passes, each gradient with the chunk's tasks as its first dimension; the flag)."""
        leaves, grads_by_task, chunks = private
        if grads_by_task is None:  # the passes accumulated them (unweighted heads): nothing to add
            return
        totals: dict[int, Tensor] = {}
        if chunks:
            for start, grads in grads_by_task:
                present = [(k, g) for k, g in enumerate(grads) if g is not None]
                if not present:
                    continue
                rows = present[0][1].shape[0]
                # all leaves' gradients side by side, then one product with the chunk's coefficients:
                # a tensordot per leaf costs a dispatch each, and a head has a weight and a bias
                side = torch.cat([g.reshape(rows, -1) for _, g in present], dim=1)
                summed = head[start:start + rows].to(side.dtype) @ side
                for (k, g), part in zip(present, summed.split([g[0].numel() for _, g in present]), strict=True):
                    part = part.view(g.shape[1:])
                    totals[k] = part if k not in totals else totals[k].add_(part)
        else:
            coefficients = head.tolist()
            present = [(k, g, c) for c, grads in zip(coefficients, grads_by_task, strict=True)
                       for k, g in enumerate(grads) if g is not None]
            # one fused multiply for every task's tensors, each by its task's weight (a small model pays
            # per call), also where every weight is 1 (unweighted heads): a pass may return one tensor
            # for two leaves (a loss h₁ + h₂ hands both the same gradient), so a gradient it returns is
            # never added into in place nor made a leaf's .grad
            tensors = [g for _, g, _ in present]
            scaled = torch._foreach_mul(tensors, [c for _, _, c in present]) if tensors else []
            for (k, _, _), g in zip(present, scaled, strict=True):
                totals[k] = g if k not in totals else totals[k].add_(g)
        for k, total in totals.items():
            leaf = leaves[k]
            if total.dtype != leaf.dtype:
                total = total.to(leaf.dtype)
            _accumulate_grad(leaf, total)

    def _eye(self, n: int, like: Tensor) -> Tensor:
        """The n×n identity in ``like``'s dtype and device, made once (the vmapped passes' selector)."""
        key = (n, like.dtype, like.device)
        cache = self.__dict__.setdefault("_eye_cache", {})
        eye = cache.get(key)
        if eye is None:
            eye = cache[key] = torch.eye(n, dtype=like.dtype, device=like.device)
        return eye

    @property
    def _theta_dtype(self) -> torch.dtype:
        """J's dtype: the widest of θ's (see :func:`~polytask.engine.jacobian.jacobian_dtype`), read at
        each step (``model.double()`` between steps changes it)."""
        return jacobian_dtype(self.theta)

    @property
    def _shared_ids(self) -> set[int]:
        ids = getattr(self, "_shared_id_cache", None)
        if ids is None:
            ids = self._shared_id_cache = {id(p) for p in self.shared}
        return ids

    def _clip_factors(self, theta_gramian: Tensor | None) -> Tensor | None:
        """cᵢ = min(1, max_norm / ‖gᵢ‖) on θ, when per-task clipping is on."""
        if self.task_clip is None or theta_gramian is None:
            return None
        norms = theta_gramian.diagonal().clamp_min(0).sqrt()
        return (self.task_clip / norms.clamp_min(1e-12)).clamp(max=1.0).to(theta_gramian.dtype)

    def _add_flat_grad(self, flat: Tensor, reached: set[int] | None) -> None:
        """θ's ``.grad`` += ``flat`` (d, flat), on θ's tensors whose indices are in ``reached`` (every one
        for None): one no task's loss depends on this step keeps its ``.grad`` as it is (None stays
        None), as after autograd's backward; a zero gradient written there was still moved by momentum
        and weight decay (AdamW: 0.006 a step on an unused layer). The routes that take J know which
        they reached from their passes (a gradient None, a row's view not written), the others from
        the walk of the graph they make anyway."""
        # ``flat`` is the caller's fresh tensor: a first gradient can be a view of it (its slices are
        # disjoint), which saves a copy per parameter; one call of torch's C++ makes every view shaped
        # as its parameter (a split and a view per parameter cost a dispatch each: 19 µs of a tiny
        # model's step for four tensors)
        for k, (p, g) in enumerate(zip(self.theta, torch._C._nn.unflatten_dense_tensors(flat, self.theta), strict=True)):
            if reached is not None and k not in reached:
                continue
            if g.dtype != p.dtype:
                g = g.to(p.dtype)
            if p.grad is None and p.is_contiguous():  # the usual first gradient: the view itself (g is contiguous)
                p.grad = g
            else:
                _accumulate_grad(p, g)

    @staticmethod
    def _leaves(total: Tensor | list[Tensor], exclude: list[Tensor], stop: list[Tensor] = (),  # type: ignore[assignment]
                excluded: list[Tensor] | None = None) -> list[Tensor]:
        """Leaf tensors requiring grad that ``total`` (a tensor or several) depends on, minus
        ``exclude``, not looking past the tensors ``stop`` (the shared representation); those of
        ``exclude`` it depends on are appended to ``excluded`` when given."""
        skip = {id(p) for p in exclude}
        seen: set[int] = {id(z.grad_fn) for z in stop if z.grad_fn is not None}
        leaves: list[Tensor] = []
        stack = [t.grad_fn for t in total] if isinstance(total, list) else [total.grad_fn]
        pop, push, mark = stack.pop, stack.append, seen.add  # the walk visits every node of the graph
        while stack:
            fn = pop()
            if fn is None:
                continue
            key = id(fn)
            if key in seen:
                continue
            mark(key)
            if type(fn) is _ACCUMULATE_GRAD:  # a type test: getattr on other nodes raises inside (slow)
                var = fn.variable
                if id(var) not in skip:
                    leaves.append(var)
                elif excluded is not None:
                    excluded.append(var)
                continue
            for next_fn, _ in fn.next_functions:
                push(next_fn)
        return leaves


def _check_leaves(shared: list[Tensor]) -> None:
    for p in shared:
        if p.grad_fn is not None:
            raise InvalidParameterError(
                f"a shared parameter of shape {tuple(p.shape)} is not a leaf tensor (it is computed from other "
                "tensors, which would get no update): pass the parameters it is computed from")


def _bad_loss(task: str, loss: Tensor) -> InvalidParameterError:
    """The error for a task's loss that is not a scalar with a gradient."""
    if not isinstance(loss, Tensor):
        return InvalidParameterError(f"the loss of task '{task}' must be a scalar tensor or None; found "
                                     f"{type(loss).__name__}")
    if loss.dim():
        return InvalidParameterError(f"the loss of task '{task}' must be a scalar (reduce it with .mean() or .sum()); "
                                     f"found shape {tuple(loss.shape)}")
    if not loss.dtype.is_floating_point:  # a complex loss: a weight per task has no order to minimise it in
        return InvalidParameterError(f"the loss of task '{task}' must be a real floating-point scalar; found dtype "
                                     f"{loss.dtype} (take .abs() or .real of a complex loss)")
    return InvalidParameterError(
        f"the loss of task '{task}' does not require grad (it was computed under torch.no_grad, detached, or from no "
        "parameter): it would train nothing; pass None for a task without a loss this step")


def _hold(tensors: Iterable[Tensor], held: list[tuple[Tensor, dict[Any, Any], Tensor | None, int]]) -> None:
    """Append to ``held`` each of ``tensors`` that has post-accumulate-grad hooks, with its hooks
    (taken out of it: its dict emptied, which autograd and FSDP read), ``.grad`` and version."""
    for tensor in tensors:
        hooks = tensor._post_accumulate_grad_hooks
        if hooks:
            grad = tensor.grad
            held.append((tensor, dict(hooks), grad, _version(grad)))
            hooks.clear()


def _release_hooks(held: list[tuple[Tensor, dict[Any, Any], Tensor | None, int]], *, run: bool) -> None:
    """Give each tensor its hooks back (:meth:`Engine._held_hooks`) and, with ``run``, run them on
    every tensor whose ``.grad`` the step wrote (a new tensor, or the old one changed in place), in
    their order, without grad, a hook's return refused as torch refuses it: as autograd runs them
    after a backward (and FSDP after its reduce-scatter)."""
    for tensor, hooks, _, _ in held:
        tensor._post_accumulate_grad_hooks.update(hooks)
    if not run:
        return
    with torch.no_grad():
        for tensor, hooks, before, version in held:
            grad = tensor.grad
            if grad is None or (grad is before and _version(grad) == version):
                continue  # the step reached it not: autograd runs no hook there either
            for hook in hooks.values():
                if hook(tensor) is not None:
                    raise RuntimeError("Tensor post accumulate grad hooks should return None.")


def _accumulate_grad(param: Tensor, grad: Tensor) -> None:
    """``param.grad`` += ``grad`` as autograd's AccumulateGrad does it: a first gradient laid out as
    the parameter (its strides where it is dense and not overlapping, else contiguous), a later one
    added in place. ``grad`` is the caller's own (no one else writes into it).

    Why the layout: a first gradient written as a contiguous view of the engine's flat update gave
    a channels_last or transposed weight a gradient of other strides, and torch's fused Adam and SGD
    read it in the parameter's order: a channels_last convolution's weight was 0.2 off after one
    Adam step at lr 0.1. Why in place: a caller may hold ``.grad`` (a CUDA graph's static gradient,
    a bucket's view), and ``zero_grad(set_to_none=False)`` keeps its buffers for that."""
    held = param.grad
    if grad.layout != torch.strided or (held is not None and held.layout != torch.strided):
        param.grad = grad if held is None else held + grad  # a sparse gradient (an embedding's) as it is
    elif held is not None:
        held.add_(grad)
    elif (param.is_contiguous() and grad.is_contiguous()) or grad.stride() == param.stride():
        param.grad = grad
    else:
        param.grad = torch.empty_like(param).copy_(grad)  # empty_like: the strides autograd gives


def _version(grad: Tensor | None) -> int:
    """The version counter of a ``.grad`` (-1 for None); of a DTensor's local shard, which FSDP's
    gradients are added into (the DTensor's own counter does not move then)."""
    if grad is None:
        return -1
    return (grad.to_local() if hasattr(grad, "to_local") else grad)._version


def _unique(tensors: Iterable[Tensor]) -> list[Tensor]:
    """The tensors in their order, each once (by identity)."""
    return list({id(t): t for t in tensors}.values())


def _weighted_sum(weights: Tensor, losses: Tensor) -> Tensor:
    """wᵀL as one node (w·L as mul + sum takes two), in the losses' dtype or at least float32.

    Why at least float32: where the weights learn, their gradient is the losses times the loss
    scale, which overflows float16 (65 504) under a gradient scaler's usual 65 536 and rounds in
    half precision; summed in float32, each loss's gradient is wᵢ·scale, as the seeded backward of
    constant weights gives. For float32 and float64 losses both casts are no-ops."""
    wide = torch.promote_types(losses.dtype, torch.float32)
    return torch.dot(weights.to(wide), losses.to(wide))


#: the autograd node that writes a leaf's ``.grad`` (``.variable`` is the leaf)
_ACCUMULATE_GRAD = type(torch.zeros(1, requires_grad=True).expand(1).grad_fn.next_functions[0][0])  # type: ignore[union-attr]

#: under ``gramian: auto``, the share of θ the no-J Gramian must form in closed form to be taken
AUTOGRAM_SHARE = 0.5
#: under ``gramian: auto``, the fewest entries of J (T × |θ|) for which the no-J Gramian is taken
#: (2²⁰: on MLPs at T = 4 and 10 on CPU, the no-J step was slower than the J route's up to T·|θ| ≈
#: 0.8 M entries and faster from 1.3 M on; `polytask bench small` and the sweep in docs/engine.md)
SMALL_JACOBIAN = 2**20
#: the same on a CUDA device (2²⁷): on an H200 the J route (its batched pass) was the faster up to
#: 5·10⁷ entries (1.03 against 1.54 ×floor) and the no-J Gramian from 2·10⁸ (1.98 against 2.61);
#: a GPU's per-kernel cost weighs on the no-J engine's many small products (docs/engine.md)
SMALL_JACOBIAN_CUDA = 2**27


#: per method class: whether its ``weights_key`` and its ``host_update`` speak for it (:func:`_spoken`)
_SPOKEN: weakref.WeakKeyDictionary[type, tuple[bool, bool]] = weakref.WeakKeyDictionary()


def _unaliased(grads: tuple[Tensor | None, ...]) -> tuple[Tensor | None, ...]:
    """``grads`` with each tensor whose memory an earlier one starts at replaced by a copy.

    Why: a pass hands two leaves one gradient tensor where the model adds them (z = θ₁ + θ₂ gives
    both the same gradient), and a step that works on the gradients in place (unscaling J's blocks)
    would act on that memory twice."""
    seen: set[int] = set()
    out: list[Tensor | None] = []
    for g in grads:
        if g is not None:
            pointer = g.data_ptr()
            if pointer in seen:
                g = g.clone()
            seen.add(pointer)
        out.append(g)
    return tuple(out)


def _spoken(cls: type) -> tuple[bool, bool]:
    """Whether ``cls`` has a ``weights_key`` and a ``host_update`` of its own making: each declared
    by the class that also gives its ``weights``, ``update`` and ``forward`` or by a subclass of it.
    A subclass that overrides ``weights`` alone makes no promise about them (as
    ``constant_weights`` is not inherited). Looked up once a step, so both answers are kept together."""
    known = _SPOKEN.get(cls)
    if known is None:
        def owner(attribute: str) -> type | None:
            return next((k for k in cls.__mro__ if attribute in k.__dict__), None)

        computes = [o for o in map(owner, ("weights", "update", "forward")) if o is not None]

        def speaks(name: str) -> bool:
            declared = owner(name)
            return declared is not None and declared is not Method and all(issubclass(declared, o) for o in computes)

        known = _SPOKEN[cls] = (speaks("weights_key"), speaks("host_update"))
    return known


def _free_memory(device: torch.device) -> float:
    """Bytes free for a new tensor on ``device`` (CUDA: the allocator's view; CPU: MemAvailable)."""
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:  # no /proc/meminfo (not Linux): free memory unknown, so J is never ruled out by size
        return float("inf")
    return float("inf")


def backward(losses: Mapping[str, Tensor | None], shared_params: Iterable[Tensor], method: str | Method = "equal",
             *, last_shared_params: Iterable[Tensor] | None = None, features: Iterable[Tensor] | None = None,
             compare: str = "auto", heads: str = "auto") -> StepReport:
    """One multi-task backward from any training loop, for methods without state or randomness.

    Leaves d = Σ wᵢ ∇Lᵢ in ``.grad`` of the shared and private parameters and returns the step's
    report (``report.weights`` by task name). A method that keeps state between steps or draws
    random numbers (``Method.stateful``) is refused: a one-shot call would repeat its first step
    every time. Keep an :class:`Engine` for those.
    """
    resolved = get_method(method)
    if resolved.stateful:
        name = getattr(type(resolved), "registry_name", type(resolved).__name__)
        raise InvalidParameterError(
            f"'{name}' keeps state between steps or draws random numbers, so a one-shot polytask.backward would "
            "repeat its first step on every call. Keep an engine for the whole run instead:\n"
            f"    engine = polytask.Engine({name!r}, model.shared_parameters())   # once\n"
            "    report = engine.backward(losses)                               # every step")
    engine = Engine(resolved, shared_params, last_shared_params=last_shared_params, compare=compare, heads=heads)
    return engine.backward(losses, features=features)
