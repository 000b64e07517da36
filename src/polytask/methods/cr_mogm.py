"""CR-MOGM: a moving average of another gradient method's task weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from polytask.core.errors import InvalidParameterError
from polytask.methods._weighting import PerTaskMethod
from polytask.methods.base import Step, Update, get_method, register


@register("cr_mogm")
class CRMOGM(PerTaskMethod):
    """CR-MOGM — Zhou et al., "On the Convergence of Stochastic
    Multi-Objective Gradient Manipulation and Beyond", NeurIPS 2022 (Algorithm 1, Corollary 1).

    Stochastic gradient manipulation (MGDA, PCGrad, CAGrad, …) is biased because its weights λ̂ₖ
    depend on the same noisy gradients they combine; CR-MOGM smooths them:

        λₖ = α λₖ₋₁ + (1 − α) λ̂ₖ,      d = Σᵢ λₖ,ᵢ gᵢ

    with λ̂ₖ the weights of the ``inner`` method (a registry name, with ``inner_params``; MGDA by
    default, the paper's main instance) and λ₀ = λ̂₁ (a task's first weights are taken as they are,
    TorchJD's ``CRMOGMWeighting`` convention). ``alpha = 0`` is the inner method; ``alpha = 1``
    freezes each task's first weights. The average is kept per task (a buffer keyed by task name),
    updated on the steps where the task is active. ``needs``, ``compare``, ``heads``,
    ``permutation_equivariant`` and ``batch_parts`` are the inner method's; its state is the submodule ``inner``.

    Departures: α is a constant, not the paper's schedule αₖ → 1 as the learning rate decays
    (Corollary 1). Inner methods that return a direction (needs = jacobian) or learn parameters
    through their weights (uncertainty, imtl_l) are refused: only a weighting can be averaged.
    The test cross-checks the average against TorchJD's ``CRMOGMWeighting(MGDAWeighting())``.
    """

    needs = "gramian"  # the default inner method's (MGDA); an instance takes its inner method's
    stateful = True

    def __init__(self, *, inner: str = "mgda", inner_params: Mapping[str, Any] | None = None,
                 alpha: float = 0.9) -> None:
        super().__init__()
        if not isinstance(inner, str):
            raise InvalidParameterError(f"`inner` of `cr_mogm` must be a method's registry name; found {inner!r}")
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0):
            raise InvalidParameterError(f"`alpha` of `cr_mogm` must be in [0, 1]; found {alpha!r}")
        self.inner = get_method(inner, **dict(inner_params or {}))
        if self.inner.needs == "jacobian":
            raise InvalidParameterError(
                f"`cr_mogm` averages task weights; '{inner}' returns an update direction, which has no weights to average")
        if any(True for _ in self.inner.parameters()):
            raise InvalidParameterError(
                f"`cr_mogm` averages detached task weights; '{inner}' learns parameters through its weights, which an "
                "average would cut off (use a gradient method such as mgda, pcgrad, cagrad)")
        self.needs = self.inner.needs  # type: ignore[misc]
        self.compare = self.inner.compare  # type: ignore[misc]
        self.heads = self.inner.heads  # type: ignore[misc]
        self.permutation_equivariant = getattr(self.inner, "permutation_equivariant", True)  # type: ignore[misc]
        self.batch_parts = getattr(self.inner, "batch_parts", 1)  # type: ignore[misc]
        self.alpha = float(alpha)
        self.register_buffer("average", torch.empty(0, dtype=torch.float64))
        self._remember(inner=inner, inner_params=dict(inner_params or {}), alpha=alpha)

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        super().setup(tasks, sizes=sizes, static_weights=static_weights)
        self.inner.setup(tasks, sizes=sizes, static_weights=static_weights)

    def reset_state(self, num_tasks: int) -> None:
        self.average = torch.full((num_tasks,), float("nan"), dtype=torch.float64)

    def update(self, step: Step) -> Update:
        idx = self.index(step)
        inner = self.inner(step)
        fresh = inner.weights.detach().to(self.average)
        old = self.average[idx]
        smoothed = torch.where(torch.isnan(old), fresh, self.alpha * old + (1 - self.alpha) * fresh)
        self.average[idx] = smoothed
        return Update(smoothed.to(dtype=inner.weights.dtype, device=inner.weights.device), penalty=inner.penalty)
