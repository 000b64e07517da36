"""PBI: penalty-based boundary intersection, a scalarisation around a preference ray."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from polytask.methods._preference import check_vector, vector
from polytask.methods._weighting import check_tasks
from polytask.methods.base import Method, Step, check_positive, register

#: relative floor under d₂ (its gradient is undefined on the preference ray itself)
_RAY_EPS = 1e-6


@register("pbi")
class PBI(Method):
    """Penalty-based boundary intersection — Zhang & Li, "MOEA/D: A Multiobjective Evolutionary
    Algorithm Based on Decomposition", IEEE Transactions on Evolutionary Computation, 2007 (Sec. II-C),
    as a loss scalarisation (TorchJD 0.18's ``torchjd.scalarization.PBI``).

    With f = L − z* (z*: ``reference``, 0 by default) and the unit preference ŵ = r/‖r‖
    (r: ``preference``, 1 for unlisted tasks):

        d₁ = fᵀŵ,   d₂ = ‖f − d₁ŵ‖,   Total = d₁ + θ d₂

    d₁ is the progress along the preference ray, d₂ the distance to it, penalised by θ (``theta``,
    the paper's 5). The weights are the exact gradient of Total, detached:

        wᵢ = ∂Total/∂Lᵢ = ŵᵢ + θ (fᵢ − d₁ŵᵢ) / d₂

    so Σ wᵢ∇Lᵢ = ∇Total. A task whose loss is far above the ray gets more weight, one below it
    can get a negative weight (PBI pulls the losses onto the ray). One task: w = 1. Preferences
    and the reference point are keyed by task name, so a subset of tasks uses theirs.

    Departures: d₂ = √(‖f − d₁ŵ‖² + (10⁻⁶‖f‖)²), a relative floor; TorchJD adds an absolute 10⁻¹²
    under the root, which makes the penalty vanish for losses below ~10⁻⁶. Away from the ray the
    two agree to round-off (the test compares with TorchJD's autograd gradient).
    """

    needs = "losses"

    def __init__(self, *, theta: float = 5.0, preference: Mapping[str, float] | None = None,
                 reference: Mapping[str, float] | None = None) -> None:
        super().__init__()
        self.theta = check_positive("pbi", "theta", theta, allow_zero=True)
        self.preference = check_vector("pbi", "preference", preference, "positive")
        self.reference = check_vector("pbi", "reference", reference, "finite")
        self._remember(theta=theta, preference=preference, reference=reference)

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        check_tasks(self, "preference", list(self.preference), tuple(tasks))
        check_tasks(self, "reference", list(self.reference), tuple(tasks))
        super().setup(tasks, sizes=sizes, static_weights=static_weights)

    def weights(self, step: Step) -> Tensor:
        f = step.losses.detach().double().cpu() - vector(self.reference, step.tasks, 0.0)
        r = vector(self.preference, step.tasks, 1.0)
        unit = r / r.norm()
        d1 = f @ unit
        perp = f - d1 * unit
        d2 = torch.sqrt(perp @ perp + (_RAY_EPS * f.norm()) ** 2)
        w = unit + self.theta * perp / d2 if float(d2) > 0 else unit
        return w.to(dtype=step.losses.dtype, device=step.losses.device)
