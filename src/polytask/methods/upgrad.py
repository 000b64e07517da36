"""UPGrad: average of the task gradients, each projected onto the dual cone of all of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.methods._gramian_qp import as_float64, project_dual_cone_np, to_step
from polytask.methods._preference import check_vector, vector
from polytask.methods._weighting import check_tasks
from polytask.methods.base import Method, Step, check_positive, register


@register("upgrad")
class UPGrad(Method):
    """Unconflicting projection of gradients — Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", 2024 (arXiv:2406.16232), Section 3.

    d = (1/T) Σᵢ π(gᵢ), where π projects onto the dual cone {x : Jx ≥ 0} of the task gradients.
    By their Proposition 1, π(gᵢ) = Jᵀvᵢ with vᵢ = argmin_{v ≥ eᵢ} vᵀGv (one T-variable QP each,
    quadprog), so w = (1/T) Σᵢ vᵢ. Every gⱼᵀd ≥ 0 (non-conflicting) and w ≥ 1/T.

    TorchJD's two options: ``preference`` (its ``pref_vector``), a mapping task → uᵢ ≥ 0 (1 for
    unlisted tasks) giving d = (1/T) Σᵢ uᵢ π(gᵢ), i.e. TorchJD's pref_vector u/T; and ``reg_eps``, a
    ridge added to the Gramian normalised to unit trace, G/tr G + εI, before the projection (TorchJD's
    default 1e-4; 0 here, the exact projection). Both cross-checked against TorchJD's UPGrad.
    """

    needs = "gramian"

    def __init__(self, *, preference: Mapping[str, float] | None = None, reg_eps: float = 0.0) -> None:
        super().__init__()
        self.preference = check_vector("upgrad", "preference", preference, "non_negative")
        self.reg_eps = check_positive("upgrad", "reg_eps", reg_eps, allow_zero=True)
        self._remember(**({"preference": preference} if preference is not None else {}),
                       **({"reg_eps": reg_eps} if reg_eps else {}))

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        check_tasks(self, "preference", list(self.preference), tuple(tasks))
        super().setup(tasks, sizes=sizes, static_weights=static_weights)

    def weights(self, step: Step) -> Tensor:
        # T×T arithmetic on numpy arrays (see _gramian_qp): a torch call per line cost more than the QPs
        g = as_float64(step.gramian, type(self).__name__).numpy()
        n = len(g)
        if self.reg_eps > 0:
            trace = float(np.trace(g))
            g = (g / trace if trace > 0 else np.zeros_like(g)) + self.reg_eps * np.eye(n)
        if self.preference:
            u = vector(self.preference, step.tasks, 1.0).numpy()
            w = project_dual_cone_np(g, np.diag(u)).sum(axis=0) / n
        else:
            w = project_dual_cone_np(g, np.eye(n)).mean(axis=0)
        return to_step(torch.from_numpy(w), step.gramian)
