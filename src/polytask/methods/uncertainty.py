"""Homoscedastic uncertainty weighting (UW)."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch
from torch import nn

from polytask.core.errors import InvalidParameterError
from polytask.methods._host import host_tensor, host_weights
from polytask.methods._weighting import PerTaskMethod, check_tasks
from polytask.methods.base import HostUpdate, Step, Update, register

FORMS = ("regression", "classification")
#: the largest x with a finite e^x in a Python float (math.exp raises OverflowError beyond it)
EXP_LIMIT = math.log(sys.float_info.max)


@register("uncertainty")
class Uncertainty(PerTaskMethod):
    """Uncertainty weighting — Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to
    Weigh Losses for Scene Geometry and Semantics", CVPR 2018.

    Each task has a learnable log-variance sᵢ = log σᵢ² (an ``nn.Parameter``, initialised to 0):

    - regression (Gaussian likelihood):  1/(2σᵢ²) Lᵢ + log σᵢ = ½ e^(−sᵢ) Lᵢ + ½ sᵢ
    - classification (scaled softmax):   1/σᵢ² Lᵢ + log σᵢ   = e^(−sᵢ) Lᵢ + ½ sᵢ

    The update's weights are the differentiable precision factors (½ e^(−sᵢ) or e^(−sᵢ)), its
    penalty the Σ ½ sᵢ term, so the optimiser learns sᵢ through the same backward. ``forms`` maps a
    task name to its form; unlisted tasks use ``"regression"``. ``init_log_var`` is the initial sᵢ
    (0: σᵢ² = 1, the paper's; LibMTL starts at −0.5, i.e. weights ½e^0.5 ≈ 0.82 for regression).

    The engine's own step takes :meth:`host_update`: the same weights as constants, computed on the
    host (cᵢ e^(−sᵢ) in float64, rounded to the losses' dtype) and ∂/∂sᵢ = ½ − cᵢ e^(−sᵢ) Lᵢ written
    into the log-variances' gradient, where autograd's nodes for them cost a tenth of a tiny model's
    plain backward (``polytask bench small``); they agree with the backward of :meth:`update` to
    rounding.
    """

    needs = "losses"
    stateful = True  # learnable log-variances

    def __init__(self, *, forms: Mapping[str, str] | None = None, init_log_var: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(init_log_var, (int, float)) and not isinstance(init_log_var, bool)
                and -30.0 <= init_log_var <= 30.0):
            raise InvalidParameterError(
                f"`init_log_var` of `uncertainty` must be a number in [-30, 30] (a log-variance); found {init_log_var!r}")
        self.init_log_var = float(init_log_var)
        forms = dict(forms or {})
        for task, form in forms.items():
            if form not in FORMS:
                raise InvalidParameterError(
                    f"`forms['{task}']` of `uncertainty` must be 'regression' or 'classification'; found {form!r}")
        self.forms = forms
        self.log_vars = nn.Parameter(torch.empty(0))
        self.register_buffer("scale", torch.empty(0))
        # log(scale) and ½ per task, kept so that a step's graph is two nodes (exp of a difference and
        # a dot): on a small model each autograd node costs as much as a layer's matmul
        self.register_buffer("log_scale", torch.empty(0), persistent=False)
        self.register_buffer("halves", torch.empty(0), persistent=False)
        self._remember(forms=forms, **({"init_log_var": init_log_var} if init_log_var != 0.0 else {}))

    def reset_state(self, num_tasks: int) -> None:
        check_tasks(self, "forms", list(self.forms), self.all_tasks)
        self.log_vars.data = torch.full((num_tasks,), self.init_log_var)
        self.scale = torch.tensor([1.0 if self.forms.get(t) == "classification" else 0.5 for t in self.all_tasks])
        self._derive()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._derive()  # the non-persistent buffers follow the loaded scale

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        out = super()._apply(fn, recurse)
        self._derive()  # .double(), .to(device): log(scale) again in the new dtype, not the old one's rounding
        return out

    def _derive(self) -> None:
        self.log_scale = self.scale.log()
        self.halves = torch.full_like(self.scale, 0.5)
        self.__dict__["_host_scale"] = self.scale.tolist()  # cᵢ as Python floats, for host_update

    def update(self, step: Step) -> Update:
        log_vars = self.rows(self.log_vars, step)
        log_scale, halves = self.rows(self.log_scale, step), self.rows(self.halves, step)
        # in the wider of the log-variances' and the losses' dtypes, at least float32: float64 losses get
        # float64 weights (as host_update's), and half-precision losses no half-precision log-variance
        # gradient (½ − wL would round, and overflow under a loss scale; the engine sums in float32 then)
        wide = torch.promote_types(torch.promote_types(log_vars.dtype, step.losses.dtype), torch.float32)
        if log_vars.dtype != wide:  # log(scale) in that dtype too, not the narrower one's rounding of it
            log_vars, log_scale, halves = log_vars.to(wide), self.rows(self.scale, step).to(wide).log(), halves.to(wide)
        weights = torch.exp(log_scale - log_vars)  # scale · e^(−s)
        penalty = torch.dot(log_vars, halves)  # ½ Σ s
        return Update(weights, penalty=penalty)

    def host_update(self, step: Step) -> HostUpdate:
        """:meth:`update` with wᵢ = cᵢ e^(−sᵢ) as constants and the log-variances' gradient of
        Σ wᵢ Lᵢ + ½ Σ sᵢ written out: ½ − wᵢ Lᵢ for an active task, 0 for the others."""
        rows = self.positions(step)
        parameter = self.log_vars
        plain = parameter.detach()  # a Parameter's every attribute passes through its __torch_function__
        scale, log_vars = self.__dict__["_host_scale"], plain.tolist()
        # math.exp raises OverflowError past the largest float's logarithm, where torch's exp gives inf;
        # written so that a NaN log-variance stays NaN (NaN < x is False), as in torch
        weights = [scale[r] * (math.inf if log_vars[r] < -EXP_LIMIT else math.exp(-log_vars[r])) for r in rows]
        tensor, values = host_weights(weights, step.losses)
        if not parameter.requires_grad:
            return HostUpdate(tensor, values=values)
        grad = [0.0] * len(log_vars)
        for r, w, loss in zip(rows, weights, step.losses.tolist(), strict=True):
            grad[r] = 0.5 - w * loss
        return HostUpdate(tensor, ((parameter, host_tensor(grad, plain)),), values)
