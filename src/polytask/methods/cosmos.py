"""COSMOS's objective: a linear scalarisation rewarded for pointing the losses along a preference."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor

from polytask.methods._preference import check_vector, vector
from polytask.methods._weighting import check_tasks
from polytask.methods.base import Method, Step, check_positive, register


@register("cosmos")
class COSMOS(Method):
    """COSMOS objective — Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep
    Multi-Objective Learning", ICDM 2021 (Eq. 4), as TorchJD 0.18's ``torchjd.scalarization.COSMOS``.

        Total = Σᵢ rᵢLᵢ − λ cos(r, L),   cos(r, L) = rᵀL / (‖r‖‖L‖)

    with r the ``preference`` (1 for unlisted tasks) and λ = ``penalty``. The weights are the exact
    gradient of Total, detached:

        wᵢ = rᵢ − λ (rᵢ/(‖r‖‖L‖) − cos(r, L) Lᵢ/‖L‖²)

    (w = r when every loss is 0, where the cosine is undefined). One task: w = r.

    Departures: COSMOS proper conditions the network on the preference (r is concatenated to the
    input and drawn from a Dirichlet distribution at every batch) so that one model covers the
    Pareto front. That is a model and data change polytask's encoders do not make (they take x
    only), and drawing r without conditioning would just be random loss weighting; this method is
    the COSMOS objective at one fixed preference. The test compares the weights with the autograd
    gradient of TorchJD's scalariser.
    """

    needs = "losses"

    def __init__(self, *, penalty: float = 1.0, preference: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.penalty = check_positive("cosmos", "penalty", penalty, allow_zero=True)
        self.preference = check_vector("cosmos", "preference", preference, "positive")
        self._remember(penalty=penalty, preference=preference)

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        check_tasks(self, "preference", list(self.preference), tuple(tasks))
        super().setup(tasks, sizes=sizes, static_weights=static_weights)

    def weights(self, step: Step) -> Tensor:
        losses = step.losses.detach().double().cpu()
        r = vector(self.preference, step.tasks, 1.0)
        norm = losses.norm()
        w = r
        if float(norm) > 0:
            cos = (r @ losses) / (r.norm() * norm)
            w = r - self.penalty * (r / (r.norm() * norm) - cos * losses / norm**2)
        return w.to(dtype=step.losses.dtype, device=step.losses.device)
