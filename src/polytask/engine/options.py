"""The engine's options: where task gradients are compared, what the heads receive, how often."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, StrictInt

from polytask.core.options import Options

Compare = Literal["auto", "shared", "last_shared", "features"]
Heads = Literal["auto", "weighted", "unweighted"]

#: what ``heads="auto"`` means for a gradient method (needs gramian or jacobian). Chosen by the
#: measurement in docs/engine.md (bundled benchmarks, 3 seeds, MGDA/CAGrad/UPGrad/Nash-MTL/PCGrad).
GRADIENT_METHOD_HEADS: Literal["weighted", "unweighted"] = "unweighted"


class EngineOptions(Options):
    """How the engine turns task losses into one update.

    Attributes:
        compare: where per-task gradients are compared by gradient methods: ``shared`` (all
            shared parameters θ, exact), ``last_shared`` (the last shared layer only: cheap, and
            GradNorm's definition), ``features`` (the shared representation z: about one
            backward; MGDA-UB is MGDA there) or ``auto`` (the method's own default).
        heads: what each task's private parameters (its head) receive: ``weighted`` (wᵢ ∇Lᵢ,
            the gradient of Σ wᵢ Lᵢ), ``unweighted`` (∇Lᵢ, as LibMTL's gradient methods and
            TorchJD's ``mtl_backward`` do; with per-task clipping cᵢ ∇Lᵢ) or ``auto``: the
            method's ``heads`` when it declares one (GradNorm: weighted, its weights multiply the
            losses), weighted for loss-weighting methods, ``GRADIENT_METHOD_HEADS`` for the other
            gradient methods.
        every: recompute the weights every ``every`` steps and reuse them in between (Gramian
            methods only: loss weights cost nothing to recompute, and a Jacobian method's
            direction is new every step).
        jacobian: how J is computed: ``loop`` (one backward per task), ``batched`` (vmapped,
            ``chunk_size`` tasks at a time) or ``auto`` (time both on the first steps, keep the faster).
            The no-J Gramian's per-task passes follow the same strategy.
        gramian: how a Gramian method's G = J Jᵀ on θ is computed: ``jacobian`` (materialise J,
            then G and d = Jᵀw), ``autogram`` (G from each layer's input and per-task output
            gradients, J never formed, d = Jᵀw from the same tensors: ``engine/autogram.py``) or
            ``auto`` (decided on the first step from shapes: autogram when J would not fit in half
            the free memory or when Linear/embedding layers hold half of θ; J under data
            parallelism and for ``last_shared``).
        autogram_passes: how the no-J Gramian's per-task gradients reach its per-layer blocks
            (``engine/autogram.py``): ``streamed`` (each task's head alone, then one backward of
            the trunk batched over the tasks; extra memory about one layer's per-task gradients),
            ``held`` (one backward per task keeping every layer's per-task output gradients: no
            batched backward, T × every layer's output in memory) or ``auto`` (``held`` when
            what it keeps is no more than the largest gradient in flight, as in a convolutional
            net, ``streamed`` otherwise; decided from shapes, so a resumed run decides alike).
    """

    moved: ClassVar = {"mode": "`compare` (shared, last_shared or features)",
                       "scope": "`compare` (shared, last_shared or features)"}

    compare: Compare = "auto"
    heads: Heads = "auto"
    every: StrictInt = Field(1, ge=1)
    jacobian: Literal["auto", "loop", "batched"] = "auto"
    chunk_size: StrictInt | None = Field(None, ge=1)
    gramian: Literal["auto", "autogram", "jacobian"] = "auto"
    autogram_passes: Literal["auto", "streamed", "held"] = "auto"
