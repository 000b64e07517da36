"""One backward pass of a scalar loss, straight into autograd's engine.

Why: ``torch.autograd.grad`` and ``Tensor.backward`` spend about 19 µs of Python on every call
before autograd's engine starts (their arguments normalised to tuples, each tensor tested for
``__torch_function__`` overrides one by one, the seed gradient made and checked). On a small
model (an RL or tabular network) one task's backward pass costs 80 µs, and an exact method takes
T of them a step: on the tiny model of `polytask bench small` (T = 4) that Python was a tenth of a
step. The functions here hand the same arguments to the function both of them end in
(``torch.autograd.graph._engine_run_backward``), after the checks that matter for a scalar loss
and plain tensors; anything else (a tensor subclass, a non-scalar or integer output, a loss that
does not require grad, a torch without that function) takes torch's public call, so its
behaviour and its errors are torch's own.

Departure from torch's public API: ``_engine_run_backward`` is private to torch (torch 2.3 on; it
passes its arguments on to the C++ engine's ``run_backward`` unchanged). Where it is missing, every
pass takes the public call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.overrides import has_torch_function

try:
    from torch.autograd.graph import _engine_run_backward as _run_backward
except ImportError:  # a torch without it: the public calls below
    _run_backward = None


def _direct(loss: Tensor, inputs: Sequence[Tensor]) -> bool:
    """Whether torch's public call would do nothing here but seed the pass with ones."""
    return (_run_backward is not None and loss.requires_grad and loss.numel() == 1
            and loss.dtype.is_floating_point and not has_torch_function((loss, *inputs)))


def loss_grads(loss: Tensor, inputs: tuple[Tensor, ...], *, retain_graph: bool) -> tuple[Tensor | None, ...]:
    """∇ ``loss`` w.r.t. ``inputs`` (None for an input it does not reach), nothing accumulated:
    ``torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)``."""
    if not _direct(loss, inputs):
        return torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
    return _run_backward((loss,), (torch.ones_like(loss),), retain_graph, False, inputs, True, False)


def accumulate(loss: Tensor, inputs: tuple[Tensor, ...] = (), *, retain_graph: bool = False) -> None:
    """``.grad`` += ∇ ``loss`` of ``inputs`` (every leaf it reaches when none are given):
    ``torch.autograd.backward(loss, inputs=inputs or None, retain_graph=retain_graph)``."""
    if not _direct(loss, inputs):
        torch.autograd.backward(loss, inputs=inputs or None, retain_graph=retain_graph)
        return
    _run_backward((loss,), (torch.ones_like(loss),), retain_graph, False, inputs, True, True)


def accumulate_seeded(outputs: Sequence[Tensor], seeds: Sequence[Tensor]) -> None:
    """``.grad`` += the vector-Jacobian product of each output with its seed, for every leaf the
    outputs reach, the seeds being constants (not requiring grad):
    ``torch.autograd.backward(outputs, seeds)``. An output that is a leaf gets its seed added to
    its ``.grad`` as autograd adds any gradient.

    Why: seeding the backward of the loss vector with the weights gives the same gradients, bit for
    bit, as the backward of ``torch.dot(weights, losses)`` (whose backward hands each loss its
    weight times a seed of one), without the product's node forward and backward: on the tiny model
    of `polytask bench small` a tenth of a loss-weighting method's cost beyond the plain backward.
    A method that writes out its own parameters' gradients (``Method.host_update``) has them
    accumulated by the same pass."""
    if any(seed.requires_grad for seed in seeds):  # a seed is a constant: its own gradient would be lost
        raise ValueError("accumulate_seeded takes constant seeds; use the backward of a product with them")
    if _run_backward is None or has_torch_function((*outputs, *seeds)) or not all(
            out.requires_grad and out.dtype.is_floating_point and seed.shape == out.shape and seed.dtype == out.dtype
            and seed.device == out.device for out, seed in zip(outputs, seeds, strict=True)):
        torch.autograd.backward(outputs, seeds)
        return
    _run_backward(tuple(outputs), tuple(seeds), False, False, (), True, True)


def accumulate_all(losses: Sequence[Tensor], inputs: tuple[Tensor, ...], before: Sequence[Sequence[Tensor]],
                   targets: Sequence[Tensor], *, free_graph: bool) -> None:
    """For each loss i in turn: ``targets``' ``.grad`` set to ``before[i]``, then :func:`accumulate`
    of loss i into ``inputs`` (the graph kept, except after the last loss with ``free_graph``).

    The checks of :func:`accumulate` are made once for all the losses. Each pass has a seed of its
    own: a loss that is a view of a leaf hands its seed to that leaf as its ``.grad`` (autograd
    adopts a gradient nothing else holds), and a later pass adding into that ``.grad`` would change
    a seed shared with the passes after it."""
    last = len(losses) - 1
    direct = _run_backward is not None and not has_torch_function((*losses, *inputs)) and all(
        loss.requires_grad and loss.numel() == 1 and loss.dtype.is_floating_point for loss in losses)
    for i, loss in enumerate(losses):
        for t, grad in zip(targets, before[i], strict=True):
            t.grad = grad
        retain = not (free_graph and i == last)
        if not direct:
            torch.autograd.backward(loss, inputs=inputs or None, retain_graph=retain)
            continue
        _run_backward((loss,), (torch.ones_like(loss),), retain, False, inputs, True, True)
