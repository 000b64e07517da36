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
node, and Δᵢ is the gradient flowing into the node.

How Δ is obtained (``AutogramGramian(passes=...)``): the ``streamed`` passes back-propagate each
task's loss alone through its own part of the graph (its head) to where it reads the shared
trunk, then run one backward of the trunk batched over the T tasks (autograd's own vmapped
backward, as ``is_grads_batched``); a pre-hook on each Gram-route node forms its block from A and
the T output gradients as they pass, a hook on each weight-route parameter reduces its T
gradients to Jₚ Jₚᵀ as they arrive, and the update d = Jᵀw is one ordinary backward of Σ wᵢLᵢ.
Peak extra memory: T × the largest gradient in flight plus O(T²). The ``held`` passes (one
backward per task) keep every Gram-route layer's Δ to the end and form d from them without a
second backward; ``auto`` takes them only where what they keep is no more than one activation's
T gradients (convolutional nets, whose batched backward runs one task at a time on CPU).

Departures:
    TorchJD's ``autogram.Engine`` (0.18) hooks modules, computes each module's per-sample
    Jacobian with ``torch.func`` under ``vmap`` and takes its Gramian, processing one module at a
    time inside one vmapped backward. Here the layers are found in the autograd graph (no module
    hooks, no second forward, no constraint on batch-independence: BatchNorm is fine), Linear and
    Embedding blocks are formed in closed form from K = A Aᵀ, and the heads are back-propagated
    per task before the batched pass (not T-batched through every head).
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.graph import GradientEdge, Node
from torch.utils.hooks import RemovableHandle

from polytask.core.errors import InvalidParameterError
from polytask.engine.jacobian import STRATEGIES, _write_row, cross_gramian, gramian

#: the weight-gradient route may cover at most this share of θ's values for reasons other than
#: cost (parameters read outside a layer the engine knows); beyond it, J is the better tool
UNRECOGNISED_SHARE = 0.5
#: tasks whose K Δⱼ are formed together (the Gram route's transient memory is this many tasks' Δ)
TASK_CHUNK = 8
#: how the per-task gradients reach the blocks (see AutogramGramian)
PASSES = ("auto", "streamed", "held")


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
    readers: dict[Node, list[tuple[Node, int]]] = field(default_factory=dict)  # the graph, node → its readers
    accumulators: dict[int, Node] = field(default_factory=dict)  # id of a parameter → its AccumulateGrad

    @property
    def edges(self) -> list[GradientEdge]:
        return [GradientEdge(layer.node, 0) for layer in self.layers]

    def held_size(self) -> int:
        """Values per task the held passes keep: each Gram-route layer's output gradient and each
        weight-route parameter's gradient."""
        return sum(_numel(layer.node) for layer in self.layers) + sum(p.numel() for p in self.rest)

    def largest_gradient(self) -> int:
        """Values per task of the largest gradient the backward carries: the largest output of an
        operation on activations (not of a parameter's transpose, cast or view, whose gradient a
        Gram-route layer never forms), or of a weight-route parameter's gradient. What a pass
        batched over the tasks holds T of at a time."""
        on_params = _parameter_side(self.readers)
        sizes = [_numel(node) for node in self.readers if node not in on_params]
        return max([*sizes, *(p.numel() for p in self.rest)], default=0)

    def anchors(self, layers: Sequence[Layer], rest: Sequence[Tensor]) -> tuple[list[Tensor], list[Layer]]:
        """What a streamed pass must ask autograd for so that each of ``layers``' nodes runs, when
        it asks for the weight-route parameters ``rest``: (anchor biases, layers to capture).

        Autograd executes a node only on a path to something asked for, and the weight-route
        parameters reach only the layers above them. A layer nothing reaches is the lowest of its
        branch (the first Linear, an embedding): with a bias, asking for the bias makes its node
        run (the bias gradient is a sum over rows, and is discarded); otherwise the gradient at its
        output is captured and its block formed after the pass, the one layer's T × output the
        pass holds. Layers are visited from the bottom up (forward order: a node's readers were
        created after it), so an anchor below makes every layer above it run."""
        needed: set[Node] = set()

        def mark(nodes: Sequence[Node]) -> None:
            stack = [n for n in nodes if n not in needed]
            needed.update(stack)
            while stack:
                for reader, _ in self.readers.get(stack.pop(), ()):
                    if reader not in needed:
                        needed.add(reader)
                        stack.append(reader)

        mark([self.accumulators[id(p)] for p in rest])
        biases: list[Tensor] = []
        captured: list[Layer] = []
        for layer in sorted(layers, key=lambda item: item.node._sequence_nr()):
            if layer.node in needed:
                continue
            if isinstance(layer, _Product) and layer.bias:
                biases.append(layer.params[1])
                mark([self.accumulators[id(layer.params[1])]])
            else:
                captured.append(layer)
                mark([reader for reader, _ in self.readers.get(layer.node, ())])
        return biases, captured


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
    cast between real dtypes changes no value, so the layer's block of G is the same on the original
    parameter. A cast to a complex dtype is not passed (the closed forms are real: no conjugate)."""
    while (_name(node) == "ToCopyBackward0" and len(readers[node]) == 1
           and not node._input_metadata[0].dtype.is_complex):
        node, slot = readers[node][0]
    return node, slot


def _parameter_side(readers: dict[Node, list[tuple[Node, int]]]) -> set[Node]:
    """The nodes that compute from parameters alone (transposes, casts, views of a weight): every
    path below them ends at a parameter's AccumulateGrad, none at the data (an input without
    gradient, or a tensor that is not a parameter)."""
    side: dict[Node, bool] = {}
    for start in readers:
        stack = [(start, False)]
        while stack:
            node, expanded = stack.pop()
            if node in side:
                continue
            if _name(node) == "AccumulateGrad":
                side[node] = isinstance(node.variable, torch.nn.Parameter)
                continue
            below = [nxt for nxt, _ in node.next_functions]
            if not expanded:
                stack.append((node, True))
                stack.extend((nxt, False) for nxt in below if nxt is not None and nxt not in side)
                continue
            side[node] = bool(below) and all(nxt is not None and side.get(nxt, False) for nxt in below)
    return {node for node, yes in side.items() if yes}


def _numel(node: Node) -> int:
    """Values of a node's forward outputs (the gradients that flow into it)."""
    return sum(math.prod(meta.shape) for meta in node._input_metadata)


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
        for p in params:
            if p.grad_fn is not None:  # its gradient reaches no AccumulateGrad: its block would be dropped
                raise AutogramUnavailable(_describe(p, "is not a leaf (it is computed from other tensors)"))
            if p.is_sparse:
                raise AutogramUnavailable(_describe(p, "is a sparse tensor"))
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:  # its blocks of G would be formed in each layer's own dtype
            raise AutogramUnavailable(f"the shared parameters hold {len(dtypes)} dtypes "
                                      f"({', '.join(sorted(str(d) for d in dtypes))})")
        for loss in losses:
            if loss.grad_fn is None and loss.requires_grad:  # the graph has no node for it to start at
                raise AutogramUnavailable(f"a task's loss is itself a leaf tensor of shape {tuple(loss.shape)}")
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
        return Plan(layers, rest, unrecognised, readers, accumulators)

    def _layer(self, p: Tensor, accumulators: dict[int, Node], readers: dict[Node, list[tuple[Node, int]]],
               wanted: set[int], n_tasks: int) -> tuple[Layer | None, str]:
        """The Gram-route layer that owns p, or None and why not ("" when the weight route is by choice)."""
        if p._backward_hooks:  # the Gram route forms its block from the layer's input, past the hook
            return None, "has a gradient hook (register_hook), which only its own gradient goes through"
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
        if kind in ("EmbeddingBackward0", "EmbeddingBagBackward0") and slot == 0 and node._saved_sparse:
            # its gradient is sparse, which the passes (and the update's hooks) cannot flatten
            raise AutogramUnavailable(_describe(p, "is a sparse embedding (sparse=True)"))
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
        if a.is_complex():  # K = A Aᵀ would need A's conjugate and the real part of each block
            return None, "is read by a complex matrix product"
        params: tuple[Tensor, ...] = (p,)
        bias = False
        if addmm:
            first = node.next_functions[0][0]
            while first is not None and _name(first) == "ToCopyBackward0" and len(readers[first]) == 1:
                first = first.next_functions[0][0]  # autocast's copy of the bias
            var = getattr(first, "variable", None) if first is not None else None
            out = p.numel() // a.shape[1]
            if (var is not None and id(var) in wanted and var.shape == (out,) and not var._backward_hooks
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

    ``passes``: how the per-task gradients reach the blocks.

    * ``streamed``: each task's loss is back-propagated alone through its own part of the graph
      (its head) to where it reads the shared trunk, then one backward of the trunk batched over
      the T tasks forms every Gram-route layer's block from its input and the T output gradients
      as they pass, and reduces every weight-route parameter's per-task gradients to their block
      as they arrive: nothing of size T × a layer outlives its layer (but the lowest layer of a
      branch that has no bias, whose output gradients the pass returns), so the extra memory is
      T × the largest gradient in flight (a layer's output gradient and its input gradient while
      autograd computes one from the other) plus O(T²). :meth:`direction` then takes d = Jᵀw by
      one ordinary backward of Σᵢ wᵢ Lᵢ (1/T of the T passes' time).
    * ``held``: one backward per task (``strategy``) that keeps every Gram-route layer's per-task
      output gradients and the weight-route parameters' per-task gradients to the end of the
      passes, and forms d from them without a second backward: T × every such layer's output in
      memory, but no batched backward (which runs convolutions one task at a time on CPU).
    * ``auto`` (the default): ``held`` when what it keeps is no more than what ``streamed`` holds
      at its peak anyway (its values per task, :meth:`Plan.held_size`, at most those of the
      largest gradient the backward carries, :meth:`Plan.largest_gradient`: a convolutional net
      whose parameters are small next to its activations), ``streamed`` otherwise. The rule reads
      the step's shapes only, so a resumed run decides as the first run did.

    A model whose backward cannot run batched over the tasks (an operation without a batching
    rule that raises) makes ``streamed`` warn once and hold from then on.

    ``strategy`` (``held`` only): how the per-task output gradients are obtained, as for the
    Jacobian: ``loop`` (one backward per task, each running only what its task reaches),
    ``batched`` (vectorised, ``chunk_size`` tasks at a time) or ``auto`` (both timed on the first
    calls, the faster kept). The streamed pass takes all T tasks at once: its blocks pair every
    two tasks, so it cannot split them.
    """

    def __init__(self, strategy: str = "auto", chunk_size: int | None = None, trials: int = 2,
                 routes: str = "cost", passes: str = "auto") -> None:
        if strategy not in STRATEGIES:
            raise InvalidParameterError(f"`jacobian` strategy must be one of {', '.join(STRATEGIES)}; found {strategy!r}")
        if passes not in PASSES:
            raise InvalidParameterError(f"`passes` of the no-J Gramian must be one of {', '.join(PASSES)}; found {passes!r}")
        self.planner = AutogramPlanner(routes)
        self.passes = passes
        self.chunk_size, self.trials = chunk_size, trials
        self.chosen: str | None = None if strategy == "auto" else strategy
        self.timings: dict[str, list[float]] = {"loop": [], "batched": []}
        self.last_plan: Plan | None = None
        self.last_passes: str | None = None  # the passes the last call ran (``auto`` decides per call)
        self._held: _Held | _Replay | None = None

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
        passes = self.passes
        if passes == "auto":
            passes = "held" if plan.held_size() <= plan.largest_gradient() else "streamed"
        if passes == "streamed" and any(p._backward_hooks for p in params):
            # the streamed update is one backward of Σ wᵢLᵢ, which runs a gradient hook on the combined
            # gradient; the J route (and the held passes) run it on each task's, as a non-linear hook needs
            passes = "held"
        self.last_passes = passes
        if passes == "streamed":
            try:
                g = _streamed_gramian(plan, scaled, params)
            except RuntimeError as error:
                held = self._held_passes(plan, scaled, params)  # raises too when the model defeats both
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                warnings.warn(f"the no-J Gramian cannot run this model's backward batched over the tasks: {reason}; "
                              "holding every layer's per-task output gradients instead", stacklevel=3)
                self.passes = self.last_passes = "held"
            else:
                self._held = _Replay(scaled, list(params), scale)
                return g / scale**2
        else:
            held = self._held_passes(plan, scaled, params)
        held.scale = scale
        self._held = held
        return held.gramian(len(losses), params[0]) / scale**2

    def direction(self, weights: Tensor) -> Tensor:
        """d = Σᵢ wᵢ gᵢ, flattened over the last call's parameters; frees what the call kept."""
        held, self._held = self._held, None
        if held is None:
            raise InvalidParameterError("AutogramGramian.direction needs a Gramian computed first (call it on the losses)")
        return held.direction(weights)

    def _held_passes(self, plan: Plan, losses: Sequence[Tensor], params: Sequence[Tensor]) -> _Held:
        """The held passes, loop or batched as ``strategy`` says (timed on the first calls for auto)."""
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
            held = self._passes(plan, losses, params, strategy)
        except RuntimeError:
            if strategy != "batched" or self.chosen == "batched":
                raise
            self.chosen = "loop"  # a layer without a batched backward rule: the loop always works
            held = self._passes(plan, losses, params, "loop")
        else:
            if self.chosen is None:
                if losses[0].is_cuda:
                    torch.cuda.synchronize()
                self.timings[strategy].append(time.perf_counter() - start)
        return held

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
        flat = torch.zeros(sum(p.numel() for p in self.params), dtype=ref.dtype, device=ref.device)
        where = _offsets(self.params)
        # each parameter's share is written as it is formed: never a second copy of d
        for layer, d in zip(self.plan.layers, self.deltas, strict=True):
            if d is not None:
                for p, g in zip(layer.params, layer.combine(d, w), strict=True):
                    flat[where[id(p)]].copy_(g.reshape(-1))
        if self.rest_jacobian is not None:
            rest, offset = w @ self.rest_jacobian, 0
            for p in self.plan.rest:
                flat[where[id(p)]].copy_(rest[offset:offset + p.numel()])
                offset += p.numel()
        return flat


def _offsets(params: Sequence[Tensor]) -> dict[int, slice]:
    """Each parameter's slice of the flattened θ."""
    where, offset = {}, 0
    for p in params:
        where[id(p)] = slice(offset, offset + p.numel())
        offset += p.numel()
    return where


@dataclass
class _Replay:
    """What a streamed call keeps for the update: the (scaled) losses, whose graph d = Jᵀw is
    back-propagated through once with the method's weights."""

    losses: list[Tensor]
    params: list[Tensor]
    scale: float = 1.0

    def direction(self, weights: Tensor) -> Tensor:
        ref = self.params[0]
        flat = torch.zeros(sum(p.numel() for p in self.params), dtype=ref.dtype, device=ref.device)
        where = _offsets(self.params)

        def writer(p: Tensor) -> Callable[[Tensor], Tensor]:
            def hook(grad: Tensor) -> Tensor:
                # into d as it arrives, autograd keeps a zero-stride tensor: d is the one copy
                flat[where[id(p)]].copy_(grad.reshape(-1))
                return torch.zeros((), dtype=grad.dtype, device=grad.device).expand(grad.shape)
            return hook

        handles = [p.register_hook(writer(p)) for p in self.params]
        try:
            # the gradient of Σᵢ wᵢ Lᵢ: the weights as the losses' output gradients, on the scaled
            # losses (so fp16 gradients do not underflow), unscaled after; the graph stays for the heads
            reached = [(loss, weights[i].to(loss.dtype)) for i, loss in enumerate(self.losses) if loss.requires_grad]
            if reached:
                torch.autograd.grad([loss for loss, _ in reached], self.params, grad_outputs=[w for _, w in reached],
                                    retain_graph=True, allow_unused=True)
        finally:
            for handle in handles:
                handle.remove()
        return flat.div_(self.scale) if self.scale != 1.0 else flat


#: the owner of a node reached by several tasks' losses
SHARED = -1


def _owners(roots: Sequence[Node | None]) -> dict[Node, int]:
    """Every node below the losses' roots → the one task whose loss reaches it, or ``SHARED``.

    Task i's own nodes (its head, its loss) come first in its backward; the shared trunk below
    them is reached by several losses. A node becomes shared when a second task reaches it, and
    so does everything below it (the first task reached all of that too), so every node is
    visited at most twice."""
    owner: dict[Node, int] = {}
    for i, root in enumerate(roots):
        if root is None:
            continue
        stack = [root]
        while stack:
            node = stack.pop()
            seen = owner.get(node)
            if seen == i or seen == SHARED:
                continue
            owner[node] = i if seen is None else SHARED
            stack.extend(nxt for nxt, _ in node.next_functions if nxt is not None)
    return owner


def _streamed_gramian(plan: Plan, losses: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
    """G from each task's own part of the graph, then one backward of the shared part batched over
    the T tasks, each block formed where its tensors pass.

    Starting the batched backward at the losses would send every task's head a T-batched gradient
    that is zero but for one row, and sum T of them where the heads meet (T² work in the heads: a
    fifth of the step at T = 40 on the benchmark MLP). So each task's loss is first back-propagated
    alone to the edges where its own nodes read the shared trunk (``_owners``: the "cut"), and the
    T tasks' gradients there, one layer's per-task output gradients, start the batched backward of
    the trunk. Shared parameters that one task alone reaches this step get their block (on the
    diagonal) from that task's own pass. When a task's loss is itself read by another (no own
    part), or reads two points of the trunk one of which lies below the other (AITM's towers: its
    own pass would carry the upper point's gradient into the lower one, which the batched pass
    then carries again), the batched backward starts at the losses."""
    t = len(losses)
    ref = params[0]
    g = torch.zeros(t, t, dtype=ref.dtype, device=ref.device)
    if not plan.layers and not plan.rest:
        return g
    roots = [loss.grad_fn for loss in losses]
    owner = _owners(roots)
    if any(root is not None and owner[root] == SHARED for root in roots):
        stacked = torch.stack(list(losses))
        _batched_blocks(g, plan, plan.layers, plan.rest, [stacked],
                        [torch.eye(t, dtype=stacked.dtype, device=stacked.device)])
        return (g + g.T) / 2
    edges: dict[tuple[Node, int], int] = {}
    reads: list[list[int]] = [[] for _ in range(t)]  # the cut edges task i reads
    for node, task in owner.items():
        if task == SHARED:
            continue
        for nxt, nr in node.next_functions:
            if nxt is not None and owner[nxt] == SHARED:
                k = edges.setdefault((nxt, nr), len(edges))
                if k not in reads[task]:
                    reads[task].append(k)
    if _nested(edges, reads):
        stacked = torch.stack(list(losses))
        _batched_blocks(g, plan, plan.layers, plan.rest, [stacked],
                        [torch.eye(t, dtype=stacked.dtype, device=stacked.device)])
        return (g + g.T) / 2
    own: list[list[Tensor]] = [[] for _ in range(t)]  # shared parameters only task i reaches this step
    for p in params:
        acc = plan.accumulators.get(id(p))
        if acc is not None and owner.get(acc, SHARED) != SHARED:
            own[owner[acc]].append(p)
    starts: list[Tensor | None] = [None] * len(edges)
    for i, loss in enumerate(losses):
        if loss.grad_fn is None or not (reads[i] or own[i]):
            continue
        inputs: list[GradientEdge | Tensor] = [GradientEdge(*key) for key in edges if edges[key] in reads[i]]
        order = [edges[key] for key in edges if edges[key] in reads[i]]
        grads = torch.autograd.grad(loss, [*inputs, *own[i]], retain_graph=True, allow_unused=True)
        for k, d in zip(order, grads[:len(order)], strict=True):
            if d is not None:
                if starts[k] is None:
                    starts[k] = d.new_zeros(t, *d.shape)
                starts[k][i] = d  # type: ignore[index]
        for d in grads[len(order):]:
            if d is not None:
                g[i, i] += d.double().pow(2).sum().to(g.dtype) if d.dtype != g.dtype else d.pow(2).sum()
    shared = [(key, s) for key, s in zip(edges, starts, strict=True) if s is not None]
    if shared:
        layers = [layer for layer in plan.layers if owner.get(layer.node) == SHARED]
        rest = [p for p in plan.rest if owner.get(plan.accumulators[id(p)]) == SHARED]
        outputs = [GradientEdge(*key) for key, _ in shared]
        _batched_blocks(g, plan, layers, rest, outputs, [s for _, s in shared])
    return (g + g.T) / 2


def _nested(edges: dict[tuple[Node, int], int], reads: list[list[int]]) -> bool:
    """Whether a task reads two cut edges one of which lies below the other's node."""
    keys = list(edges)
    below: dict[Node, set[Node]] = {}

    def under(node: Node) -> set[Node]:
        if node not in below:
            seen: set[Node] = set()
            stack = [nxt for nxt, _ in node.next_functions if nxt is not None]
            while stack:
                n = stack.pop()
                if n not in seen:
                    seen.add(n)
                    stack.extend(nxt for nxt, _ in n.next_functions if nxt is not None)
            below[node] = seen
        return below[node]

    for read in reads:
        nodes = {keys[k][0] for k in read}
        if len(nodes) > 1 and any(other in under(node) for node in nodes for other in nodes if other is not node):
            return True
    return False


def _batched_blocks(g: Tensor, plan: Plan, layers: Sequence[Layer], rest: Sequence[Tensor],
                    outputs: Sequence[Tensor | GradientEdge], starts: list[Tensor]) -> None:
    """Add to g the blocks of ``layers`` and ``rest`` from one backward of ``outputs`` batched over
    the T tasks (``starts``: each output's T per-task gradients, tasks first).

    The batched backward is autograd's own (``torch.autograd.grad(..., is_grads_batched=True)``
    runs the same engine under the same legacy vmap level); it is entered here by hand so that the
    hooks know the level and can see the T tasks' gradients as one T × … tensor. A Gram-route
    layer's hook (a pre-hook on its node) forms the layer's block from the gradient entering the
    node before the node computes its input gradient, after which autograd frees it; a
    weight-route parameter's hook reduces its T per-task gradients to Jₚ Jₚᵀ and hands autograd a
    zero-stride tensor in their place, so nothing of size T × |p| is returned or kept. Gram-route
    nodes compute no weight gradient: only the weight-route parameters, the anchor biases and the
    captured edges (:meth:`Plan.anchors`) are asked for."""
    t = g.shape[0]
    biases, captured = plan.anchors(layers, rest)
    ran = [layer for layer in layers if all(layer is not c for c in captured)]
    handles: list[RemovableHandle] = []
    level = torch._C._vmapmode_increment_nesting()
    try:
        def tasks(grad: Tensor) -> Tensor:
            """The T tasks' gradients as one plain tensor, tasks first."""
            return torch._remove_batch_dim(grad, level, t, 0)

        def discard(grad: Tensor) -> Tensor:
            # a plain zero (``new_zeros`` of a batched tensor would be batched already), expanded
            return torch._add_batch_dim(torch.zeros((), dtype=grad.dtype, device=grad.device).expand(t, *grad.shape),
                                        0, level)

        def on_layer(layer: Layer) -> Callable[[tuple[Tensor | None, ...]], None]:
            def hook(grad_outputs: tuple[Tensor | None, ...]) -> None:
                if grad_outputs[0] is not None:
                    g.add_(layer.gramian(tasks(grad_outputs[0])).to(g.dtype))
            return hook

        def on_param(grad: Tensor) -> Tensor:
            g.add_(gramian(tasks(grad).reshape(t, -1)).to(g.dtype))
            return discard(grad)

        handles += [layer.node.register_prehook(on_layer(layer)) for layer in ran]
        handles += [p.register_hook(on_param) for p in rest]
        handles += [p.register_hook(discard) for p in biases]
        batched = [torch._add_batch_dim(s, 0, level) for s in starts]
        starts.clear()  # autograd holds the starting gradients now, and frees them as it goes
        inputs: list[GradientEdge | Tensor] = [*(GradientEdge(layer.node, 0) for layer in captured), *rest, *biases]
        grads = torch.autograd.grad(outputs, inputs, grad_outputs=batched, retain_graph=True, allow_unused=True)
        del batched
        deltas = [None if d is None else tasks(d) for d in grads[:len(captured)]]
        del grads
    finally:
        torch._C._vmapmode_decrement_nesting()
        for handle in handles:
            handle.remove()
    for layer, d in zip(captured, deltas, strict=True):
        if d is not None:
            g += layer.gramian(d).to(g.dtype)
