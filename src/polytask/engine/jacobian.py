"""Per-task gradients of the shared parameters (the Jacobian J) and their Gramian G = J Jᵀ."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.engine.passes import accumulate_all, loss_grads

STRATEGIES = ("auto", "loop", "batched")


def _write_row(row: Tensor, grads: Sequence[Tensor | None], sizes: Sequence[int]) -> None:
    """Copy one task's gradients (or a block of tasks', ``row`` 2-D) into its preallocated row of J;
    unreached inputs get zeros. One ``torch.cat`` into the row: a slice and a copy per parameter
    cost four times as much on a small model (85 → 22 µs a row for four tensors)."""
    lead = row.shape[:-1]
    torch.cat([dense(g).reshape(*lead, n) if g is not None else row.new_zeros(*lead, n)
               for g, n in zip(grads, sizes, strict=True)], dim=-1, out=row)


def batched_grads(outputs: Tensor, inputs: Sequence[Tensor], selector: Tensor, *,
                  retain_graph: bool) -> tuple[Tensor | None, ...]:
    """The gradients of ``outputs`` w.r.t. ``inputs`` for each row of ``selector``, by one vmapped
    backward (``is_grads_batched``); a layer without a batched backward rule raises a RuntimeError
    that says so and what to use instead (torch's own names an operator and a backend only)."""
    try:
        return torch.autograd.grad(outputs, inputs, grad_outputs=selector, retain_graph=retain_graph,
                                   allow_unused=True, is_grads_batched=True)
    except RuntimeError as err:  # torch's not-implemented errors are RuntimeErrors too
        raise RuntimeError(f"a vmapped backward pass (jacobian: batched) failed: a layer without a batched "
                           f"backward rule, such as a sparse embedding (nn.Embedding(sparse=True)), needs "
                           f"jacobian: loop (torch: {str(err).splitlines()[0]})") from err


def dense(grad: Tensor) -> Tensor:
    """``grad`` as a strided tensor: a sparse one (an ``nn.Embedding(sparse=True)``'s) is written
    into J's dense row as its dense values. Departure from autograd: θ's update is then dense where
    autograd gives such a weight a sparse gradient (values equal; ``torch.optim.SparseAdam``
    refuses a dense one with its own error)."""
    return grad if grad.layout == torch.strided else grad.to_dense()


#: the most entries of J that :func:`accumulate_rows` writes; a larger J is written by copies. Why: a row
#: accumulated into is zeroed first and then read and written by ``+=``, where a copy writes it once; on
#: a small J that traffic is nothing beside the per-pass calls it saves, on a large one it is not
ACCUMULATE_MAX_ENTRIES = 1 << 20


def accumulates(tensors: Sequence[Tensor], jacobian: Tensor) -> bool:
    """Whether :func:`accumulate_rows` gives exactly what per-task passes returning the gradients
    give, for J on ``tensors`` (θ, then any other leaves the passes also reach) in ``jacobian``.

    It needs leaves (only a leaf's ``.grad`` is written by a backward pass) of J's dtype and device
    (a ``.grad`` must match its tensor), contiguous (a row's view is, and autograd wants a ``.grad``
    laid out as its tensor: a channels-last weight), no post-accumulate hooks (they would run on
    every pass, where passes that return the gradients run none) and, so that hooks stay torch's
    business alone, no tensor hooks either; and a J small enough."""
    if jacobian.numel() > ACCUMULATE_MAX_ENTRIES:
        return False
    dtype, device = jacobian.dtype, jacobian.device
    return all(t.is_leaf and t.dtype == dtype and t.device == device and t.is_contiguous() and not t._backward_hooks
               and t._post_accumulate_grad_hooks is None for t in tensors)


def accumulate_rows(losses: Sequence[Tensor], theta: Sequence[Tensor], rows: Sequence[Sequence[Tensor]],
                    others: Sequence[Tensor] = (), *, free_graph: bool = False) -> None:
    """Row i of J (``rows[i]``: views of it shaped as θ's tensors, zeroed by the caller) gets ∇ Lᵢ
    on θ, and every tensor of ``others`` Σᵢ ∇ Lᵢ added to its ``.grad``, by one accumulating
    backward pass per task with θ's ``.grad`` pointed at row i (θ's own ``.grad`` is put back after,
    also when a pass fails). ``free_graph``: the last pass frees the graph.

    Why: on a small model, a pass that returns its gradients and a copy of them into J's row (a
    ``torch.cat`` of reshaped tensors) cost more than the arithmetic; autograd's own accumulation
    writes the row in the pass, and the others' sum needs no per-task tensors at all. On the tiny
    model of ``polytask bench small`` a step's T = 4 passes took 70 µs less. Use
    :func:`accumulates` first."""
    saved = [t.grad for t in theta]
    try:
        accumulate_all(losses, (*theta, *others), rows, theta, free_graph=free_graph)
    finally:
        for t, grad in zip(theta, saved, strict=True):
            t.grad = grad


def row_views(jacobian: Tensor, shapes: Sequence[torch.Size]) -> list[list[Tensor]]:
    """For each row of ``jacobian`` (T×P), views of it shaped as ``shapes`` (P = Σ their sizes). The
    views of one tensor's columns share a version counter of their own (their column block's
    ``.data``; a view shares its base's): a pass that accumulates into one of them as a ``.grad``
    moves that counter alone, which tells whether any pass reached the tensor."""
    sizes = [s.numel() for s in shapes]
    blocks = [block.data for block in jacobian.split(sizes, dim=1)]
    return [[block[i].view(shape) for block, shape in zip(blocks, shapes, strict=True)]
            for i in range(jacobian.shape[0])]


def jacobian_dtype(inputs: Sequence[Tensor]) -> torch.dtype:
    """The dtype of J on ``inputs``: the widest of theirs. Why: J in the first tensor's dtype rounded
    a float32 layer's gradients to bfloat16 where a bfloat16 layer came first (2e-3 off)."""
    dtype = inputs[0].dtype
    for p in inputs[1:]:
        if p.dtype != dtype:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def _empty_jacobian(rows: int, inputs: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    if not inputs:
        raise InvalidParameterError("the task Jacobian needs at least one shared parameter; the model has none")
    sizes = [p.numel() for p in inputs]
    return torch.empty(rows, sum(sizes), dtype=jacobian_dtype(inputs), device=inputs[0].device), sizes


def task_jacobian(losses: Sequence[Tensor], inputs: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """J (T×P) by a per-task loop: row i is ∇ Lᵢ w.r.t. ``inputs``, flattened and concatenated.

    Each backward only runs the part of the graph task i reaches (its own head, then the shared
    encoder), so no task back-propagates through another task's head. Gradients are written
    straight into one preallocated J: at T=40 on the benchmark MLP, J is 290 MB, and every extra
    copy of it (concatenating rows, stacking them) costs as much time as a backward pass. ``out``:
    storage to write J into (its first T rows), e.g. kept from an earlier step.
    """
    if out is None:
        jacobian, sizes = _empty_jacobian(len(losses), inputs)
    else:
        jacobian, sizes = out[:len(losses)], [p.numel() for p in inputs]
    inputs = tuple(inputs)
    for i, loss in enumerate(losses):
        _write_row(jacobian[i], loss_grads(loss, inputs, retain_graph=True), sizes)
    return jacobian


def batched_task_jacobian(losses: Tensor, inputs: Sequence[Tensor], chunk_size: int | None = None) -> Tensor:
    """J by vectorised backward passes (``is_grads_batched``), ``chunk_size`` tasks at a time.

    Chunking bounds the memory of the batched graph; it is one vmapped backward per chunk.
    """
    n = losses.shape[0]
    jacobian, sizes = _empty_jacobian(n, inputs)
    chunk = n if chunk_size is None else max(1, min(chunk_size, n))
    for start in range(0, n, chunk):
        rows = min(chunk, n - start)
        selector = torch.zeros(rows, n, dtype=losses.dtype, device=losses.device)
        selector[torch.arange(rows), torch.arange(start, start + rows)] = 1.0
        grads = batched_grads(losses, inputs, selector, retain_graph=True)
        _write_row(jacobian[start:start + rows], grads, sizes)
    return jacobian


class JacobianComputer:
    """Computes J with a per-task loop or batched backward.

    ``auto`` takes the loop on CPU, where it wins (and a timed choice would make two runs of one
    seed, or a run and its resume, round differently whenever the machine is loaded). On CUDA,
    where batched backward can win, it times both on the first real steps (each timed call is a
    step's actual J, so nothing is wasted) and keeps the faster; the timings and the choice are
    in ``state_dict()``, so a run resumed after the choice takes the same route.
    """

    def __init__(self, strategy: str = "auto", chunk_size: int | None = None, trials: int = 2) -> None:
        if strategy not in STRATEGIES:
            raise InvalidParameterError(f"`jacobian` strategy must be one of {', '.join(STRATEGIES)}; found {strategy!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise InvalidParameterError(f"`chunk_size` must be an int >= 1 or None; found {chunk_size!r}")
        self.strategy, self.chunk_size, self.trials = strategy, chunk_size, trials
        self.timings: dict[str, list[float]] = {"loop": [], "batched": []}
        self.chosen: str | None = None if strategy == "auto" else strategy

    def __call__(self, losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
        """J of the scalar ``losses`` (pass the tasks' own loss tensors, not views of one stacked
        vector: a row of a stack back-propagates zeros into every other task's head)."""
        if self.chosen is None and not losses[0].is_cuda:
            self.chosen = "loop"
        if self.chosen is not None:
            return self._run(self.chosen, losses, inputs)
        pending = [s for s in ("loop", "batched") if len(self.timings[s]) < self.trials]
        if not pending:
            self.chosen = min(self.timings, key=lambda s: min(self.timings[s]))
            return self._run(self.chosen, losses, inputs)
        strategy = min(pending, key=lambda s: len(self.timings[s]))
        cuda = losses[0].is_cuda
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            result = self._run(strategy, losses, inputs)
        except RuntimeError:
            # some layers have no batched backward rule; the loop always works
            self.chosen = "loop"
            return self._run("loop", losses, inputs)
        if cuda:
            torch.cuda.synchronize()
        self.timings[strategy].append(time.perf_counter() - start)
        return result

    def loops(self, like: Tensor) -> bool:
        """Whether J of tensors on ``like``'s device is (or will be) taken by the per-task loop."""
        return self.chosen == "loop" or (self.chosen is None and not like.is_cuda)

    def state_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "timings": {k: list(v) for k, v in self.timings.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.strategy == "auto":  # an explicit strategy given now wins over a saved choice
            self.chosen = state.get("chosen")
            self.timings = {k: list(state.get("timings", {}).get(k, [])) for k in ("loop", "batched")}

    def _run(self, strategy: str, losses: Sequence[Tensor], inputs: Sequence[Tensor]) -> Tensor:
        if strategy == "loop":
            return task_jacobian(losses, inputs)
        return batched_task_jacobian(torch.stack(list(losses)), inputs, self.chunk_size)


#: columns per block of the Gramian's products on the CPU (see `gramian`): 2¹⁵ columns of J (1.3 MB of
#: float32 at T = 10) stay in a core's L2 cache; 2¹⁶ took 10.6 ms at T = 10, P = 1.85 M against 7.8
#: (and 32 against 24 ms at P = 5 M), the same at T = 4 and at T = 20 and 40, where the product is
#: bound by its arithmetic
GRAM_BLOCK = 1 << 15


def gramian(jacobian: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """G = J Jᵀ, accumulated over column blocks of J and symmetrised.

    For the wide, short J of MTL (T rows, millions of columns) one GEMM is slow on CPU (T=10,
    P=1.85M: 15 ms on the machine of the last measurement); summing J_b J_bᵀ over blocks of
    ``GRAM_BLOCK`` columns takes 7.8 ms.
    """
    t = jacobian.shape[0]
    if jacobian.shape[1] <= block:  # one block: J Jᵀ itself (0 + J Jᵀ, bit for bit), two operations fewer
        g = jacobian @ jacobian.T
    else:
        g = torch.zeros(t, t, dtype=jacobian.dtype, device=jacobian.device)
        for part in jacobian.split(block, dim=1):
            g.addmm_(part, part.T)
    return (g + g.T) / 2


#: the most tasks whose Gramian :func:`host_gramian` reads onto the host
HOST_GRAMIAN_TASKS = 8
#: half the largest value of each dtype :func:`host_gramian` has met (``torch.finfo`` builds an object a call)
_HALF_MAX: dict[torch.dtype, float] = {}


def host_gramian(jacobian: Tensor) -> tuple[Tensor, list[list[float]] | None]:
    """:func:`gramian` of J, bit for bit, with G's entries as Python floats (rows) where they were
    read: for a CPU J of at most :data:`HOST_GRAMIAN_TASKS` rows in one column block, the values are
    None only if J Jᵀ is not symmetric as computed or not finite.

    Why: the few-task solvers read G as Python floats anyway, and on a small model the two tensor
    operations that symmetrise a 4×4 G and the float64 sum that tests it for finiteness cost more
    than reading it. Where the product is exactly symmetric (the BLAS kernels sum both halves in the
    same order on most shapes) and no entry reaches half the dtype's largest value, (G + Gᵀ) / 2 is G
    itself; otherwise it is formed as :func:`gramian` forms it."""
    n, width = jacobian.shape
    if not (jacobian.is_cpu and n <= HOST_GRAMIAN_TASKS and width <= GRAM_BLOCK):
        return gramian(jacobian), None
    raw = jacobian @ jacobian.T
    rows = raw.tolist()
    limit = _HALF_MAX.get(jacobian.dtype)  # below it, a + b cannot overflow: (a + a) / 2 is a
    if limit is None:
        limit = _HALF_MAX[jacobian.dtype] = torch.finfo(jacobian.dtype).max / 2
    for i, row in enumerate(rows):
        if not abs(row[i]) < limit:  # NaN too
            return (raw + raw.T) / 2, None
        for j in range(i + 1, n):
            if row[j] != rows[j][i] or not abs(row[j]) < limit:
                return (raw + raw.T) / 2, None
    return raw, rows


class JacobianPieces:
    """J on θ as vmapped backward passes give it and never concatenated: for each chunk of tasks
    (its first row and its number of rows), one (rows, nₖ) block per tensor of θ (None where the
    chunk's tasks do not reach it).

    Why: for a method that reads only G, the engine needs G = J Jᵀ and Jᵀw, and both are sums over
    these blocks. Copying them into one T×P tensor would hold a second J at the step's peak (the
    passes' own gradients next to J: 2× J on a GPU, where ``jacobian: auto`` takes the batched
    passes) and spend a write and a read of J on the copy.
    """

    def __init__(self, chunks: list[tuple[int, int, list[Tensor | None]]], rows: int, sizes: Sequence[int],
                 like: Tensor, dtype: torch.dtype | None = None) -> None:
        self.chunks, self.sizes = chunks, list(sizes)
        self.shape = (rows, sum(self.sizes))
        self.dtype, self.device = dtype or like.dtype, like.device

    def div_(self, value: float) -> JacobianPieces:
        for _, _, blocks in self.chunks:
            for block in blocks:
                if block is not None:
                    block.div_(value)
        return self

    def gramian(self) -> Tensor:
        """G = J Jᵀ (T×T), symmetrised as :func:`gramian` does: Gₐᵦ = Σₖ Jₐₖ Jᵦₖᵀ over θ's tensors k."""
        g = torch.zeros(self.shape[0], self.shape[0], dtype=self.dtype, device=self.device)
        for i, (start_a, rows_a, blocks_a) in enumerate(self.chunks):
            for start_b, rows_b, blocks_b in self.chunks[i:]:
                part = g[start_a:start_a + rows_a, start_b:start_b + rows_b]
                for a, b in zip(blocks_a, blocks_b, strict=True):
                    if a is None or b is None:
                        continue
                    if a.dtype != self.dtype:  # θ of several dtypes: each block in J's (the widest)
                        a, b = a.to(self.dtype), b.to(self.dtype)
                    if a.is_cuda or a.shape[1] <= GRAM_BLOCK:
                        part.addmm_(a, b.T)
                    else:  # on the CPU a wide product is faster in column blocks (see `gramian`)
                        for pa, pb in zip(a.split(GRAM_BLOCK, dim=1), b.split(GRAM_BLOCK, dim=1), strict=True):
                            part.addmm_(pa, pb.T)
                if start_b != start_a:
                    g[start_b:start_b + rows_b, start_a:start_a + rows_a] = part.T
        return (g + g.T) / 2

    def transpose_times(self, w: Tensor) -> Tensor:
        """Jᵀw (P,), flattened in θ's order (the update on θ)."""
        w = w.to(self.dtype)
        out = torch.zeros(self.shape[1], dtype=self.dtype, device=self.device)
        parts = out.split(self.sizes)
        for start, rows, blocks in self.chunks:
            for k, block in enumerate(blocks):
                if block is not None:
                    parts[k].addmv_(block.T.to(self.dtype), w[start:start + rows])
        return out


def transpose_times(jacobian: Tensor | JacobianPieces, w: Tensor) -> Tensor:
    """Jᵀw of a T×P Jacobian or of its pieces."""
    return jacobian.transpose_times(w) if isinstance(jacobian, JacobianPieces) else w @ jacobian


def cross_gramian(a: Tensor, b: Tensor, block: int = GRAM_BLOCK) -> Tensor:
    """A Bᵀ of two Jacobians of the same parameters (T×T, not symmetric), over column blocks as ``gramian``."""
    g = torch.zeros(a.shape[0], b.shape[0], dtype=a.dtype, device=a.device)
    for pa, pb in zip(a.split(block, dim=1), b.split(block, dim=1), strict=True):
        g.addmm_(pa, pb.T)
    return g
