"""The Gramian of the task gradients without the task Jacobian ("autogram").

Gramian-based Jacobian descent (Quinton & Rey, "Jacobian Descent for Multi-Objective
Optimization", arXiv 2406.16232, 2024, Algorithm 3) observes that a method that reads only
G = J Jᵀ never needs the T × |θ| matrix J: G is a sum over parameters, G = Σₚ Jₚ Jₚᵀ, and each
layer's block can be formed from what the backward pass already has, the layer's input and
the per-task gradients at its output.

For a matrix product out = A Wᵀ + b (``nn.Linear``; A is n × in, one row per sample or
position) and the per-task output gradients Δᵢ (n × out), task i's gradient is Δᵢᵀ A on W and
1ᵀ Δᵢ on b, so

    Gᵢⱼ (W, b) = Σ_{r, r'} K_{r r'} ⟨Δᵢ[r], Δⱼ[r']⟩,   K = A Aᵀ + 1 1ᵀ,

computed as G = vec(Δ) vec(K Δ)ᵀ in n²·in + T·n²·out + T²·n·out operations instead of the
T·n·in·out of the per-task weight gradients: the cheaper one is chosen per layer (the Gram route
wins when n < in). For ``nn.Embedding`` the per-task gradient is non-zero on the rows the batch
looks up only, so it is formed on those u rows (T × u × dim) and its Gramian taken. Every other
shared parameter (convolutions, normalisation affines, recurrent weights, parameters read by
several operations or outside a layer) takes the weight-gradient route: autograd computes its
per-task gradient in the same passes, and its block Jₚ Jₚᵀ is added. G is exact whatever the
model does; only the route of each parameter changes.

Where the layers are: the engine reads them from the step's autograd graph, not from module
hooks. A parameter qualifies for the Gram route when the graph shows it read by exactly one
matrix product (``AddmmBackward0``/``MmBackward0``, directly or through one transpose) or one
embedding lookup; the layer's input A (or the indices) is the tensor autograd saved for that
node, and Δᵢ is the gradient flowing into the node, which ``torch.autograd.grad`` returns when
asked for the node's ``GradientEdge``. The T passes that produce Δᵢ stop at those edges and
compute no weight gradient for Gram-route layers.

Departures:
    TorchJD's ``autogram.Engine`` (0.18) hooks modules, computes each module's per-sample
    Jacobian with ``torch.func`` under ``vmap`` and takes its Gramian, processing one module at a
    time inside one vmapped backward. Here the layers are found in the autograd graph (no hooks,
    no second forward, no constraint on batch-independence: BatchNorm is fine), Linear and
    Embedding blocks are formed in closed form, and the per-task output gradients of the Gram-
    route layers are all held until the end of the passes: peak extra memory is T times those
    layers' outputs (plus the per-task gradients of the weight-route parameters), not one
    layer's.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node

from polytask.core.errors import InvalidParameterError
from polytask.engine.jacobian import STRATEGIES, _write_row, cross_gramian, gramian

#: the weight-gradient route may cover at most this share of θ's values for reasons other than
#: cost (parameters read outside a layer the engine knows); beyond it, J is the better tool
UNRECOGNISED_SHARE = 0.5
#: tasks whose K Δⱼ are formed together (the Gram route's transient memory is this many tasks' Δ)
TASK_CHUNK = 8


class AutogramUnavailable(RuntimeError):
    """The model's graph defeats the no-J Gramian; the message says why (one line)."""


def _name(node: Node) -> str:
    return type(node).__name__


def _at_least_float32(t: Tensor) -> Tensor:
    """Gram products of fp16/bf16 activations (autocast) in float32: K = A Aᵀ sums n products."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass
class _Product:
    """out = A Wᵀ (+ b) read from one ``addmm``/``mm`` node; W (and b) read nowhere else."""

    node: Node
    inputs: Tensor  # A, n × in
    params: tuple[Tensor, ...]
    bias: bool
    transposed: bool  # W is (out, in) read through a transpose (F.linear), else (in, out)

    def gramian(self, deltas: Tensor) -> Tensor:
        a = _at_least_float32(self.inputs)
        d = deltas.reshape(deltas.shape[0], a.shape[0], -1).to(a.dtype)
        k = a @ a.T
        if self.bias:
            k += 1.0  # the bias is a column of ones in A
        flat = d.reshape(d.shape[0], -1)
        columns = []
        for chunk in d.split(TASK_CHUNK):  # K Δⱼ a few tasks at a time: never a second copy of Δ
            columns.append(cross_gramian(flat, torch.matmul(k, chunk).reshape(chunk.shape[0], -1)))
        return torch.cat(columns, dim=1)

    def combine(self, deltas: Tensor, weights: Tensor) -> list[Tensor]:
        """Σᵢ wᵢ gᵢ on (W, b): one product with the weighted output gradient, as a backward would."""
        a = _at_least_float32(self.inputs)
        d = torch.tensordot(weights.to(a.dtype), deltas.reshape(deltas.shape[0], a.shape[0], -1).to(a.dtype), 1)
        grads = [d.T @ a if self.transposed else a.T @ d]
        if self.bias:
            grads.append(d.sum(0))
        return grads


@dataclass
class _Lookup:
    """out = weight[indices] (``nn.Embedding``); the weight read nowhere else."""

    node: Node
    indices: Tensor
    params: tuple[Tensor, ...]
    padding_idx: int | None

    def gramian(self, deltas: Tensor) -> Tensor:
        weight = self.params[0]
        idx = self.indices.reshape(-1)
        d = deltas.reshape(deltas.shape[0], idx.numel(), -1).to(weight.dtype)
        if self.padding_idx is not None:  # the padding row receives no gradient
            keep = idx != self.padding_idx
            idx, d = idx[keep], d[:, keep]
        rows, where = torch.unique(idx, return_inverse=True)
        per_task = d.new_zeros(d.shape[0], rows.numel(), d.shape[2]).index_add_(1, where, d)
        return gramian(per_task.reshape(d.shape[0], -1))

    def combine(self, deltas: Tensor, weights: Tensor) -> list[Tensor]:
        weight = self.params[0]
        idx = self.indices.reshape(-1)
        d = torch.tensordot(weights.to(weight.dtype), deltas.reshape(deltas.shape[0], idx.numel(), -1).to(weight.dtype), 1)
        if self.padding_idx is not None:
            keep = idx != self.padding_idx
            idx, d = idx[keep], d[keep]
        return [torch.zeros_like(weight).index_add_(0, idx, d)]


@dataclass
class _Bag:
    """out[b] = Σ_{k in bag b} sₖ weight[indicesₖ] (``nn.EmbeddingBag``, sum or mean: sₖ is 1, the
    per-sample weight, or 1 / the bag's size); the weight read nowhere else."""

    node: Node
    indices: Tensor
    bags: Tensor  # the bag of every index (autograd's offset2bag)
    scales: Tensor | None  # sₖ, None for 1
    params: tuple[Tensor, ...]
    padding_idx: int | None

    def gramian(self, deltas: Tensor) -> Tensor:
        weight = self.params[0]
        idx, bags = self.indices.reshape(-1), self.bags.reshape(-1)
        d = deltas.reshape(deltas.shape[0], -1, weight.shape[1]).to(weight.dtype)
        scales = self.scales
        if self.padding_idx is not None:
            keep = idx != self.padding_idx
            idx, bags = idx[keep], bags[keep]
            scales = None if scales is None else scales[keep]
        rows, where = torch.unique(idx, return_inverse=True)
        spread = d[:, bags]  # (T, indices, dim): each index receives its bag's output gradient
        if scales is not None:
            spread = spread * scales.to(spread.dtype)[None, :, None]
        per_task = d.new_zeros(d.shape[0], rows.numel(), d.shape[2]).index_add_(1, where, spread)
        return gramian(per_task.reshape(d.shape[0], -1))

    def combine(self, deltas: Tensor, weights: Tensor) -> list[Tensor]:
        weight = self.params[0]
        idx, bags = self.indices.reshape(-1), self.bags.reshape(-1)
        d = torch.tensordot(weights.to(weight.dtype), deltas.reshape(deltas.shape[0], -1, weight.shape[1]).to(weight.dtype), 1)
        scales = self.scales
        if self.padding_idx is not None:
            keep = idx != self.padding_idx
            idx, bags = idx[keep], bags[keep]
            scales = None if scales is None else scales[keep]
        spread = d[bags] if scales is None else d[bags] * scales.to(d.dtype)[:, None]
        return [torch.zeros_like(weight).index_add_(0, idx, spread)]


Layer = _Product | _Lookup | _Bag


@dataclass
class Plan:
    """How each shared parameter's block of G is formed this step."""

    layers: list[Layer]
    rest: list[Tensor]  # the weight-gradient route: their per-task gradients are computed
    unrecognised: list[tuple[str, int]]  # parameters on the weight route other than by cost: why, size

    @property
    def edges(self) -> list[GradientEdge]:
        return [GradientEdge(layer.node, 0) for layer in self.layers]


def _consumers(roots: Sequence[Node]) -> dict[Node, list[tuple[Node, int]]]:
    """Every node of the graph below ``roots`` → the (node, input slot) pairs that read it."""
    readers: dict[Node, list[tuple[Node, int]]] = defaultdict(list)
    seen = set(roots)
    stack = list(roots)
    while stack:
        fn = stack.pop()
        for slot, (nxt, _) in enumerate(fn.next_functions):
            if nxt is None:
                continue
            readers[nxt].append((fn, slot))
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return readers


def _past_casts(node: Node, slot: int, readers: dict[Node, list[tuple[Node, int]]]) -> tuple[Node, int]:
    """The first reader that is not a dtype copy (autocast's), when each copy has one reader: a
    cast changes no value, so the layer's block of G is the same on the original parameter."""
    while _name(node) == "ToCopyBackward0" and len(readers[node]) == 1:
        node, slot = readers[node][0]
    return node, slot


def _describe(p: Tensor, why: str) -> str:
    return f"a shared parameter of shape {tuple(p.shape)} {why}"


class AutogramPlanner:
    """Reads the step's graph and assigns every parameter of θ to a route (see the module doc).

    ``routes``: ``cost`` takes, for each matrix product, the route with fewer operations;
    ``gram`` takes the Gram route for every product it recognises (to check that route).
    """

    def __init__(self, routes: str = "cost") -> None:
        if routes not in ("cost", "gram"):
            raise InvalidParameterError(f"`routes` of the autogram planner must be cost or gram; found {routes!r}")
        self.routes = routes

    def plan(self, losses: Sequence[Tensor], params: Sequence[Tensor]) -> Plan:
        roots = [loss.grad_fn for loss in losses if loss.grad_fn is not None]
        readers = _consumers(roots)
        accumulators = {id(fn.variable): fn for fn in readers if _name(fn) == "AccumulateGrad"}
        wanted = {id(p) for p in params}
        layers: list[Layer] = []
        claimed: set[int] = set()
        unrecognised: list[tuple[str, int]] = []
        n_tasks = len(losses)
        for p in params:
            if id(p) in claimed or id(p) not in accumulators:
                continue  # no task reaches p: its block of G is zero
            layer, why = self._layer(p, accumulators, readers, wanted, n_tasks)
            if layer is not None:
                layers.append(layer)
                claimed.update(id(q) for q in layer.params)
            elif why:
                unrecognised.append((_describe(p, why), p.numel()))
        rest = [p for p in params if id(p) in accumulators and id(p) not in claimed]
        return Plan(layers, rest, unrecognised)

    def _layer(self, p: Tensor, accumulators: dict[int, Node], readers: dict[Node, list[tuple[Node, int]]],
               wanted: set[int], n_tasks: int) -> tuple[Layer | None, str]:
        """The Gram-route layer that owns p, or None and why not ("" when the weight route is by choice)."""
        users = readers[accumulators[id(p)]]
        if len(users) != 1:
            return None, f"is read by {len(users)} operations"
        node, slot = users[0]
        node, slot = _past_casts(node, slot, readers)
        kind = _name(node)
        transposed = kind == "TBackward0"
        if transposed:  # F.linear: out = A Wᵀ
            if len(readers[node]) != 1:
                return None, f"is read transposed by {len(readers[node])} operations"
            node, slot = _past_casts(*readers[node][0], readers)
            kind = _name(node)
        if (kind, slot) in (("AddmmBackward0", 2), ("MmBackward0", 1)) and p.dim() == 2:
            return self._product(node, p, transposed, accumulators, readers, wanted, n_tasks)
        if kind == "AddmmBackward0" and slot == 0 and p.dim() == 1:
            return None, ""  # a bias: with its weight on the Gram route, or small on the weight route
        if kind == "EmbeddingBackward0" and slot == 0:
            return self._lookup(node, p)
        if kind == "EmbeddingBagBackward0" and slot == 0:
            return self._bag(node, p)
        if kind in ("ConvolutionBackward0", "NativeLayerNormBackward0", "NativeBatchNormBackward0",
                    "CudnnBatchNormBackward0", "MiopenBatchNormBackward0", "NativeGroupNormBackward0"):
            return None, ""  # known layers whose per-task weight gradient is the cheap route
        return None, f"is read by {kind}, not by a layer the no-J Gramian knows (Linear, Embedding)"

    def _product(self, node: Node, p: Tensor, transposed: bool, accumulators: dict[int, Node], readers: dict[Node, list[tuple[Node, int]]],
                 wanted: set[int], n_tasks: int) -> tuple[Layer | None, str]:
        addmm = _name(node) == "AddmmBackward0"
        if addmm and (node._saved_alpha != 1 or node._saved_beta != 1):
            return None, "is read by a scaled addmm"
        a = node._saved_mat1 if addmm else node._saved_self
        if a is None or a.dim() != 2 or a.shape[1] != p.shape[1 if transposed else 0]:
            return None, "is read by a matrix product whose input autograd did not save"
        params: tuple[Tensor, ...] = (p,)
        bias = False
        if addmm:
            first = node.next_functions[0][0]
            while first is not None and _name(first) == "ToCopyBackward0" and len(readers[first]) == 1:
                first = first.next_functions[0][0]  # autocast's copy of the bias
            var = getattr(first, "variable", None) if first is not None else None
            out = p.numel() // a.shape[1]
            if (var is not None and id(var) in wanted and var.shape == (out,)
                    and len(readers[accumulators[id(var)]]) == 1):
                params, bias = (p, var), True
        n, fin = a.shape
        out = p.numel() // fin
        gram_cost = n * n * fin + n_tasks * n * n * out + n_tasks ** 2 * n * out
        weight_cost = n_tasks * n * fin * out + n_tasks ** 2 * fin * out
        if gram_cost >= weight_cost and self.routes == "cost":
            return None, ""
        return _Product(node, a.detach(), params, bias, transposed), ""

    @staticmethod
    def _lookup(node: Node, p: Tensor) -> tuple[Layer | None, str]:
        if node._saved_scale_grad_by_freq:
            return None, "is an embedding with scale_grad_by_freq"
        pad = int(node._saved_padding_idx)
        return _Lookup(node, node._saved_indices, (p,), pad if 0 <= pad < p.shape[0] else None), ""

    @staticmethod
    def _bag(node: Node, p: Tensor) -> tuple[Layer | None, str]:
        mode = int(node._saved_mode)  # 0 sum, 1 mean, 2 max
        if mode not in (0, 1) or node._saved_scale_grad_by_freq:
            return None, "is an embedding bag in max mode or with scale_grad_by_freq"
        idx, bags = node._saved_indices, node._saved_result1
        if bags is None or bags.shape != idx.shape:
            return None, "is an embedding bag whose bag of each index autograd did not save"
        pad = int(node._saved_padding_idx)
        padding = pad if 0 <= pad < p.shape[0] else None
        scales = node._saved_per_sample_weights
        if mode == 1:  # the mean over each bag's non-padding entries (autograd's bag_size)
            sizes = node._saved_result2.clamp_min(1).to(p.dtype)
            scales = (1.0 / sizes)[bags] if scales is None else scales / sizes[bags]
        return _Bag(node, idx, bags, None if scales is None else scales.detach(), (p,), padding), ""


class AutogramGramian:
    """G = J Jᵀ on ``params`` from the task losses, J never formed (see the module doc).

    ``strategy``: how the per-task output gradients are obtained, as for the Jacobian: ``loop``
    (one backward per task, each running only what its task reaches), ``batched`` (vectorised,
    ``chunk_size`` tasks at a time) or ``auto`` (both timed on the first calls, the faster kept).

    After a call, :meth:`direction` gives d = Jᵀw on the same parameters from what the call kept
    (each layer's output gradients and input): the update needs no second backward through θ.
    """

    def __init__(self, strategy: str = "auto", chunk_size: int | None = None, trials: int = 2,
                 routes: str = "cost") -> None:
        if strategy not in STRATEGIES:
            raise InvalidParameterError(f"`jacobian` strategy must be one of {', '.join(STRATEGIES)}; found {strategy!r}")
        self.planner = AutogramPlanner(routes)
        self.chunk_size, self.trials = chunk_size, trials
        self.chosen: str | None = None if strategy == "auto" else strategy
        self.timings: dict[str, list[float]] = {"loop": [], "batched": []}
        self.last_plan: Plan | None = None
        self._held: _Held | None = None

    def __call__(self, losses: Sequence[Tensor], params: Sequence[Tensor], scale: float = 1.0) -> Tensor:
        """G of the losses on ``params``; the per-task passes use the losses times ``scale`` (a
        gradient scaler's), which G and :meth:`direction` divide out."""
        self._held = None
        plan = self.planner.plan(losses, params)
        self.last_plan = plan
        total = sum(p.numel() for p in params)
        odd = sum(n for _, n in plan.unrecognised)
        if odd > UNRECOGNISED_SHARE * total:
            raise AutogramUnavailable(f"{plan.unrecognised[0][0]} ({odd:,} of {total:,} shared values are read "
                                      "outside a layer it recognises)")
        scaled = [loss * scale for loss in losses] if scale != 1.0 else list(losses)
        strategy = self.chosen
        if strategy is None:
            pending = [s for s in ("loop", "batched") if len(self.timings[s]) < self.trials]
            if not pending:
                self.chosen = min(self.timings, key=lambda s: min(self.timings[s]))
                strategy = self.chosen
            else:
                strategy = min(pending, key=lambda s: len(self.timings[s]))
        start = time.perf_counter()
        try:
            held = self._passes(plan, scaled, params, strategy)
        except RuntimeError:
            if strategy != "batched" or self.chosen == "batched":
                raise
            self.chosen = "loop"  # a layer without a batched backward rule: the loop always works
            held = self._passes(plan, scaled, params, "loop")
        else:
            if self.chosen is None:
                if scaled[0].is_cuda:
                    torch.cuda.synchronize()
                self.timings[strategy].append(time.perf_counter() - start)
        held.scale = scale
        self._held = held
        return held.gramian(len(losses), params[0]) / scale**2

    def direction(self, weights: Tensor) -> Tensor:
        """d = Σᵢ wᵢ gᵢ, flattened over the last call's parameters; frees what the call kept."""
        held, self._held = self._held, None
        if held is None:
            raise InvalidParameterError("AutogramGramian.direction needs a Gramian computed first (call it on the losses)")
        return held.direction(weights)

    def _passes(self, plan: Plan, losses: Sequence[Tensor], params: Sequence[Tensor], strategy: str) -> _Held:
        """The per-task gradients at the Gram-route layers' outputs and of the weight-route parameters."""
        t = len(losses)
        ref = params[0]
        edges, rest = plan.edges, plan.rest
        sizes = [p.numel() for p in rest]
        held = _Held(plan, list(params), [None] * len(edges),
                     torch.empty(t, sum(sizes), dtype=ref.dtype, device=ref.device) if rest else None)
        if not edges and not rest:
            return held
        inputs: list[GradientEdge | Tensor] = [*edges, *rest]
        if strategy == "loop":
            for i, loss in enumerate(losses):
                grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
                held.store(slice(i, i + 1), [None if g is None else g[None] for g in grads[:len(edges)]], t)
                if held.rest_jacobian is not None:
                    _write_row(held.rest_jacobian[i], grads[len(edges):], sizes)
            return held
        stacked = torch.stack(list(losses))
        chunk = t if self.chunk_size is None else max(1, min(self.chunk_size, t))
        for start in range(0, t, chunk):
            rows = min(chunk, t - start)
            selector = torch.zeros(rows, t, dtype=stacked.dtype, device=stacked.device)
            selector[torch.arange(rows), torch.arange(start, start + rows)] = 1.0
            grads = torch.autograd.grad(stacked, inputs, grad_outputs=selector, retain_graph=True,
                                        allow_unused=True, is_grads_batched=True)
            held.store(slice(start, start + rows), list(grads[:len(edges)]), t)
            if held.rest_jacobian is not None:
                _write_row(held.rest_jacobian[start:start + rows], grads[len(edges):], sizes)
        return held


@dataclass
class _Held:
    """What one call keeps for the update: the Gram-route layers' per-task output gradients and
    the weight-route parameters' per-task gradients (T × their size)."""

    plan: Plan
    params: list[Tensor]
    deltas: list[Tensor | None]
    rest_jacobian: Tensor | None
    scale: float = 1.0

    def store(self, rows: slice, grads: Sequence[Tensor | None], n_tasks: int) -> None:
        for k, d in enumerate(grads):
            if d is not None:
                if self.deltas[k] is None:
                    self.deltas[k] = d.new_zeros(n_tasks, *d.shape[1:])
                self.deltas[k][rows] = d  # type: ignore[index]

    def gramian(self, n_tasks: int, ref: Tensor) -> Tensor:
        g = torch.zeros(n_tasks, n_tasks, dtype=ref.dtype, device=ref.device)
        for layer, d in zip(self.plan.layers, self.deltas, strict=True):
            if d is not None:
                g += layer.gramian(d).to(g.dtype)
        if self.rest_jacobian is not None:
            g += gramian(self.rest_jacobian)
        return (g + g.T) / 2

    def direction(self, weights: Tensor) -> Tensor:
        ref = self.params[0]
        w = weights.to(ref.dtype) / self.scale
        grads: dict[int, Tensor] = {}
        for layer, d in zip(self.plan.layers, self.deltas, strict=True):
            if d is not None:
                grads.update((id(p), g) for p, g in zip(layer.params, layer.combine(d, w), strict=True))
        if self.rest_jacobian is not None:
            flat, offset = w @ self.rest_jacobian, 0
            for p in self.plan.rest:
                grads[id(p)] = flat[offset:offset + p.numel()]
                offset += p.numel()
        return torch.cat([grads[id(p)].reshape(-1).to(ref.dtype) if id(p) in grads else
                          torch.zeros(p.numel(), dtype=ref.dtype, device=ref.device) for p in self.params])
