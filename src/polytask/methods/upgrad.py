"""UPGrad: average of the task gradients, each projected onto the dual cone of all of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from polytask.methods import _small_qp
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

    Up to :data:`~polytask.methods._small_qp.SMALL_T` tasks the T QPs are solved in plain Python
    floats (:func:`~polytask.methods._small_qp.dual_cone_weights`), larger T or a singular face by
    the factored quadprog projection of :func:`~polytask.methods._gramian_qp.project_dual_cone`.
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
        assert step.gramian is not None
        n = len(step.gramian)
        if n <= _small_qp.SMALL_T:
            # few tasks: plain Python floats, which stay fast inside a step where numpy does not
            w = self._weights_small(step.gramian_values(), step.tasks)
            if w is not None:
                return _small_qp.weights_like(w, step.gramian)
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

    def _weights_small(self, g: list[list[float]], tasks: Sequence[str]) -> list[float] | None:
        """:meth:`weights` on a list-of-rows Gramian (None: hand it to the numpy path)."""
        n = len(g)
        if self.reg_eps > 0:
            trace = sum(g[i][i] for i in range(n))
            g = [[(v / trace if trace > 0 else 0.0) + (self.reg_eps if i == j else 0.0) for j, v in enumerate(row)]
                 for i, row in enumerate(g)]
        u = [float(self.preference.get(task, 1.0)) for task in tasks] if self.preference else [1.0] * n
        total = _small_qp.dual_cone_weights(g, u)
        return None if total is None else [v / n for v in total]
