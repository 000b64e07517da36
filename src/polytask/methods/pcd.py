"""PCD: follow a primary task's gradient, guaranteeing every other task a share of progress."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._gramian_qp import as_float64, factor, project_polyhedron, to_step
from polytask.methods._weighting import PerTaskMethod, check_tasks
from polytask.methods.base import Step, check_positive, register


def _fraction(name: str, value: object) -> float:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0):
        raise InvalidParameterError(f"`{name}` of `pcd` must be a number in [0, 1]; found {value!r}")
    return float(value)


@register("pcd")
class PCD(PerTaskMethod):
    """Priority-constrained descent — Varam et al., "Not All Objectives Are Born Equal:
    Priority-Constrained Descent for Hierarchical Multi-Objective Optimization", TMLR 2026
    (arXiv:2606.29521), as TorchJD 0.18 implements it (``torchjd.aggregation.PCD``).

    One task p is primary (``primary``; the first task given to setup() by default). With the
    normalised gradients g̃ᵢ = sᵢgᵢ, sᵢ = 1/√(v̂ᵢ + ε), v̂ᵢ the bias-corrected moving average of
    ‖gᵢ‖² with decay β:

        d̃ = argmin_d ½‖d − g̃ₚ‖²   s.t.   g̃ⱼᵀd ≥ τⱼ‖g̃ⱼ‖²   for every other task j

    and the update is d̃ rescaled to ‖gₚ‖: d = ‖gₚ‖/‖d̃‖ · d̃. From the KKT conditions d̃ = g̃ₚ + Σⱼ μⱼg̃ⱼ
    (μ ≥ 0), so wₚ = sₚ‖gₚ‖/‖d̃‖ and wⱼ = μⱼsⱼ‖gₚ‖/‖d̃‖. The QP is solved exactly in the rank-k
    factor of the normalised Gramian (quadprog), as TorchJD's active-set solver does. ``tau`` is one
    fraction for every secondary task or a mapping task → fraction (unlisted tasks: 0.02).

    Special cases (TorchJD's): gₚ = 0 gives d = 0; infeasible constraints (two opposed secondary
    gradients) are dropped, d = gₚ; d̃ = 0 up to round-off gives d = 0. The moving averages are one
    entry per task with its own count (bias correction 1 − β^nᵢ), so a task that skips steps is
    normalised by its own history. When the primary task has no loss at a step, the first active
    task in setup() order is primary for that step. The test cross-checks the weights against
    TorchJD's PCD over several steps.
    """

    needs = "gramian"
    stateful = True

    def __init__(self, *, primary: str | None = None, tau: float | Mapping[str, float] = 0.02, beta: float = 0.999,
                 eps: float = 1e-8) -> None:
        super().__init__()
        if primary is not None and not isinstance(primary, str):
            raise InvalidParameterError(f"`primary` of `pcd` must be a task name or None; found {primary!r}")
        self.primary = primary
        if isinstance(tau, Mapping):
            self.tau: float | dict[str, float] = {str(t): _fraction(f"tau['{t}']", v) for t, v in tau.items()}
        else:
            self.tau = _fraction("tau", tau)
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0.0 <= beta < 1.0):
            raise InvalidParameterError(f"`beta` of `pcd` must be in [0, 1); found {beta!r}")
        self.beta = float(beta)
        self.eps = check_positive("pcd", "eps", eps, allow_zero=True)
        self.register_buffer("sq_norm_ema", torch.empty(0, dtype=torch.float64))
        self.register_buffer("counts", torch.empty(0, dtype=torch.long))
        self._remember(primary=primary, tau=tau, beta=beta, eps=eps)

    def setup(self, tasks: Sequence[str], *, sizes: Mapping[str, int] | None = None,
              static_weights: Mapping[str, float] | None = None) -> None:
        if self.primary is not None:
            check_tasks(self, "primary", [self.primary], tuple(tasks))
        if isinstance(self.tau, dict):
            check_tasks(self, "tau", list(self.tau), tuple(tasks))
        super().setup(tasks, sizes=sizes, static_weights=static_weights)

    def reset_state(self, num_tasks: int) -> None:
        self.sq_norm_ema = torch.zeros(num_tasks, dtype=torch.float64)
        self.counts = torch.zeros(num_tasks, dtype=torch.long)

    def _primary_position(self, step: Step) -> int:
        order = {t: i for i, t in enumerate(self.all_tasks)}
        if self.primary is not None and self.primary in step.tasks:
            return step.tasks.index(self.primary)
        return min(range(len(step.tasks)), key=lambda i: order[step.tasks[i]])

    def weights(self, step: Step) -> Tensor:
        idx = self.index(step)
        g = as_float64(step.gramian, type(self).__name__)  # the T×T problem is solved on the CPU
        sq_norms = g.diagonal().clamp_min(0)
        counts = self.counts[idx].cpu() + 1
        ema = self.beta * self.sq_norm_ema[idx].cpu() + (1 - self.beta) * sq_norms
        self.sq_norm_ema[idx] = ema.to(self.sq_norm_ema.device)
        self.counts[idx] = counts.to(self.counts.device)
        denominators = (ema / (1 - self.beta ** counts.double()) + self.eps).sqrt()
        scales = torch.where(denominators > 0, 1.0 / denominators.clamp_min(1e-300), torch.zeros_like(denominators))
        p = self._primary_position(step)
        w = torch.zeros(len(g), dtype=torch.float64)
        if float(sq_norms[p]) <= 0:
            return to_step(w, step.gramian)
        gn = g * torch.outer(scales, scales)
        others = [i for i in range(len(g)) if i != p]
        mult = torch.zeros(len(g), dtype=torch.float64)
        mult[p] = 1.0
        if others:
            unit = float(gn.diagonal().max())
            f = factor(gn / unit)
            taus = torch.tensor([self._tau(step.tasks[j]) for j in others], dtype=torch.float64)
            sol = project_polyhedron(f[others], f[p], taus * gn.diagonal()[others] / unit)
            if sol is not None:  # infeasible constraints are dropped: d̃ = g̃ₚ
                mult[others] = sol[1]
        dn_sq = float(mult @ gn @ mult)
        magnitude = float(mult.abs() @ gn.diagonal().clamp_min(0).sqrt()) ** 2
        precision = 10.0 * torch.finfo(step.gramian.dtype).eps  # type: ignore[union-attr]
        if dn_sq > precision * magnitude:
            w = mult * scales * (float(sq_norms[p]) / dn_sq) ** 0.5
        return to_step(w, step.gramian)

    def _tau(self, task: str) -> float:
        return self.tau.get(task, 0.02) if isinstance(self.tau, dict) else self.tau
