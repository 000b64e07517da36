"""GradVac: pull each pairwise gradient cosine up to an adaptive (EMA) target."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._gramian_qp import as_float64, to_step
from polytask.methods._groups import check_group_type, column_groups
from polytask.methods._lazy_state import resize_to_state
from polytask.methods._weighting import PerTaskMethod
from polytask.methods.base import Step, Update, register

_EPS = 1e-8


@register("gradvac")
class GradVac(PerTaskMethod):
    """Gradient Vaccine — Wang et al., "Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models", ICLR 2021, Algorithm 1.

    For each task i, in a random order of the others j, with φᵢⱼ = cos(g_i^PC, gⱼ) and EMA target
    φ̂ᵢⱼ: if φᵢⱼ < φ̂ᵢⱼ, g_i^PC += ‖g_i^PC‖(φ̂ᵢⱼ√(1−φᵢⱼ²) − φᵢⱼ√(1−φ̂ᵢⱼ²)) / (‖gⱼ‖√(1−φ̂ᵢⱼ²)) · gⱼ;
    then φ̂ᵢⱼ ← (1−β)φ̂ᵢⱼ + βφᵢⱼ. The update is Σᵢ g_i^PC, tracked as coefficients over the gₖ from
    G alone. Differences from the paper: one θ (all shared parameters) instead of per-layer
    targets, and β = 0.5 by default (LibMTL's and TorchJD's default). The targets φ̂ (a T×T buffer
    over the setup() tasks, zero-initialised) are the only state, with the task names, so a fresh
    method loads a saved state; orders come from ``step.generator`` (same draws as TorchJD's GradVac).

    ``group_type`` is LibMTL's ``GradVac_group_type``: ``whole`` (0, the default: one θ, from G),
    ``layer`` (1) or ``matrix`` (2): the same corrections per group k of θ's columns (a layer, or
    one parameter tensor), each with its own cosines and targets φ̂ᵢⱼₖ (a T×T×K buffer), in one
    random order of the others per task shared by the groups (LibMTL's loop order). The update then
    differs per group, so a grouped GradVac needs J (and the tensor shapes the engine passes with
    it, ``Step.param_shapes``) and returns the direction, with weights 1 as LibMTL's
    ``batch_weight``; layers are recovered from the tensor shapes (``methods/_groups.py``: a weight
    and its bias, a norm layer's weight and bias), where LibMTL walks the encoder's leaf modules.
    The test re-derives LibMTL's grouped loop (it cannot be installed beside this torch) and
    compares the engine's update on θ for both group types.
    """

    needs = "gramian"
    stateful = True
    permutation_equivariant: ClassVar[bool] = False

    def __init__(self, *, beta: float = 0.5, group_type: str = "whole") -> None:
        super().__init__()
        if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0.0 <= beta <= 1.0):
            raise InvalidParameterError(f"`beta` of `GradVac` must be in [0, 1]; found {beta!r}")
        self.beta = float(beta)
        self.group_type = check_group_type("gradvac", group_type)
        if self.group_type == "whole":
            self.register_buffer("targets", torch.zeros(0, 0, dtype=torch.float64))
            self._remember(beta=beta)
        else:
            self.needs = "jacobian"  # type: ignore[misc]  # the groups' columns of J
            self.register_buffer("group_targets", torch.zeros(0, 0, 0, dtype=torch.float64))
            self._remember(beta=beta, group_type=group_type)

    def reset_state(self, num_tasks: int) -> None:
        if self.group_type == "whole":
            self.targets = torch.zeros(num_tasks, num_tasks, dtype=torch.float64)
        else:
            self.group_targets = torch.zeros(num_tasks, num_tasks, 0, dtype=torch.float64)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        if self.group_type != "whole":  # the number of groups is known from the first step
            resize_to_state(self, state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def update(self, step: Step) -> Update:
        if self.group_type == "whole":
            return Update(self.weights(step))
        return self._grouped(step)

    def _grouped(self, step: Step) -> Update:
        j = step.jacobian.detach()  # type: ignore[union-attr]  # Method.forward checked
        idx = self.index(step).tolist()
        groups = column_groups(step.param_shapes, j.shape[1], self.group_type)
        if self.group_targets.shape[2] != len(groups):
            if bool((self.group_targets != 0).any()):
                raise InvalidParameterError(
                    f"`gradvac` keeps targets for {self.group_targets.shape[2]} parameter groups; the step has {len(groups)}")
            t = len(self.all_tasks)
            self.group_targets = torch.zeros(t, t, len(groups), dtype=torch.float64, device=self.group_targets.device)
        jd = j.double().cpu()
        gns = [(jd[:, g] @ jd[:, g].T).numpy() for g in groups]
        targets = self.group_targets.detach().cpu().numpy().copy()
        n = len(idx)
        coefs = [np.eye(n) for _ in groups]
        for i in range(n):
            others = [j_ for j_ in range(n) if j_ != i]
            order = [others[k] for k in torch.randperm(n - 1, generator=step.generator).tolist()]
            cgs = [coefs[k][i] @ gns[k] for k in range(len(groups))]
            for jj in order:
                for k, gn in enumerate(gns):
                    c, cg = coefs[k], cgs[k]
                    norm_i = max(float(cg @ c[i]), 0.0) ** 0.5
                    norm_j = max(float(gn[jj, jj]), 0.0) ** 0.5
                    phi = float(cg[jj] / (norm_i * norm_j + _EPS))
                    target = float(targets[idx[i], idx[jj], k])
                    if phi < target:
                        s_phi, s_hat = max(1 - phi * phi, 0.0) ** 0.5, max(1 - target * target, 0.0) ** 0.5
                        step_ij = norm_i * (target * s_phi - phi * s_hat) / (norm_j * s_hat + _EPS)
                        c[i, jj] += step_ij
                        cgs[k] = cg = cg + step_ij * gn[jj]
                    targets[idx[i], idx[jj], k] = (1 - self.beta) * target + self.beta * phi
        self.group_targets.copy_(torch.from_numpy(targets))
        direction = torch.cat([torch.from_numpy(c.sum(axis=0)) @ jd[:, g] for c, g in zip(coefs, groups, strict=True)])
        return Update(torch.ones_like(step.losses), direction=direction.to(dtype=j.dtype, device=j.device))

    def weights(self, step: Step) -> Tensor:
        g = as_float64(step.gramian, type(self).__name__)
        idx = self.index(step).tolist()
        n = len(g)
        # T² sequential scalar updates: numpy float64 avoids torch's per-op overhead
        gn = g.numpy()
        targets = self.targets.detach().cpu().numpy().copy()
        c = np.eye(n)
        norms = np.sqrt(np.clip(np.diagonal(gn), 0, None))
        for i in range(n):
            cg = c[i] @ gn
            others = [j for j in range(n) if j != i]
            for j in [others[k] for k in torch.randperm(n - 1, generator=step.generator).tolist()]:
                norm_i = max(float(cg @ c[i]), 0.0) ** 0.5
                phi = float(cg[j] / (norm_i * norms[j] + _EPS))
                target = float(targets[idx[i], idx[j]])
                if phi < target:
                    s_phi, s_hat = max(1 - phi * phi, 0.0) ** 0.5, max(1 - target * target, 0.0) ** 0.5
                    step_ij = norm_i * (target * s_phi - phi * s_hat) / (norms[j] * s_hat + _EPS)
                    c[i, j] += step_ij
                    cg = cg + step_ij * gn[j]
                targets[idx[i], idx[j]] = (1 - self.beta) * target + self.beta * phi
        self.targets.copy_(torch.from_numpy(targets))
        return to_step(torch.from_numpy(c.sum(axis=0)), step.gramian)
