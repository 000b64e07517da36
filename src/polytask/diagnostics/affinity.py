"""Lookahead inter-task affinity (TAG): how a step on one task changes every task's loss.

Fifty, Amid, Zhao, Yu, Anil & Finn, "Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS 2021, eq. (1)-(3). With shared parameters θ at step t, a batch B and θ′ᵢ the
shared parameters after an update on task i's loss alone (the heads unchanged),

    Z_{i→j} = 1 − L_j(B, θ′ᵢ) / L_j(B, θ),

positive when a step on task i lowers task j's loss on the same batch. TAG computes Z every k
steps and averages it over training; ``AffinityStats`` keeps the mean per epoch and overall.

Cost of one affinity step with T tasks: one forward with a graph at θ (it gives every L_j(θ)),
T gradients of the shared parameters from that graph (one backward each), T lookahead updates
and T forwards without a graph at θ′ᵢ. The model's parameters, buffers and the optimizer's
state are never written: forwards go through ``torch.func.functional_call`` with cloned
parameters and buffers, updates through a fresh optimizer over clones.

Departures:
    - The lookahead update is the run's own optimizer (its class, parameter-group settings and a
      copy of its state before the step: Adam's moments and step count, SGD's momentum buffer, weight decay),
      not the paper's hand-written SGD-with-momentum step (whose reference code, as published,
      applies plain SGD with weight decay because it reads the momentum buffer from the wrong
      dictionary). For SGD with momentum this is the paper's rule.
    - Z is not divided by the learning rate (the reference code divides; the paper's eq. (3)
      does not). Only the ranking of groupings matters, which a constant factor leaves alone.
    - Dropout draws the same masks in the T + 1 forwards of one affinity step (a fixed seed per
      step), so Z measures the update and not a change of masks; BatchNorm uses batch statistics
      as in training, on cloned running buffers.
    - A task whose loss at θ is 0, or not finite, gives no Z onto it that step (NaN, skipped by
      the averages).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError

#: θ′ from θ and a gradient: both keyed by parameter name
Update = Callable[[Mapping[str, Tensor], Mapping[str, Tensor]], dict[str, Tensor]]
#: per-task losses at the given parameters (None: no labelled sample for that task)
LossesAt = Callable[[Mapping[str, Tensor]], Mapping[str, Tensor | None]]


def sgd_update(lr: float) -> Update:
    """θ′ = θ − lr·g: the plain gradient step (tests, and a loop without an optimizer)."""
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise InvalidParameterError(f"`lr` of the lookahead step must be > 0; found {lr!r}")
    return lambda params, grads: {n: (params[n] - lr * grads[n]).detach() for n in params}


class OptimizerLookahead:
    """The optimizer's own update applied to copies of the shared parameters.

    ``snapshot()`` records a copy of every shared parameter's optimizer state (call it at the θ
    the lookahead starts from); ``__call__`` builds a fresh optimizer of the same class over
    clones, with the parameter groups' settings as they are at the call (the learning rate the
    step used: schedules move it between epochs, after the step's callbacks), gives each clone the
    recorded state and the task's gradient, and returns the stepped clones. The real optimizer is
    never touched.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, shared: Mapping[str, nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.shared = dict(shared)
        owner = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        missing = [n for n, p in self.shared.items() if id(p) not in owner]
        if missing:
            raise InvalidParameterError(f"the lookahead needs the optimizer to own every shared parameter; "
                                        f"not owned: {missing[:3]}")
        self.group_of = {n: owner[id(p)] for n, p in self.shared.items()}
        self.state: dict[str, dict[str, Any]] | None = None

    def snapshot(self) -> None:
        self.state = {n: copy.deepcopy(self.optimizer.state.get(p, {})) for n, p in self.shared.items()}

    def __call__(self, params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        if self.state is None:
            self.snapshot()
        assert self.state is not None
        settings = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        clones = {n: params[n].detach().clone() for n in self.shared}
        groups: dict[int, list[Tensor]] = {}
        for n, c in clones.items():
            groups.setdefault(self.group_of[n], []).append(c)
        fresh = type(self.optimizer)([{**settings[g], "params": ps} for g, ps in groups.items()])
        for n, c in clones.items():
            fresh.state[c] = copy.deepcopy(self.state[n])
            c.grad = grads[n].detach().to(c.dtype)
        fresh.step()
        return {n: c.detach() for n, c in clones.items()}


def lookahead_affinity(losses_at: LossesAt, params: Mapping[str, Tensor], shared: Sequence[str], update: Update,
                       tasks: Sequence[str]) -> Tensor:
    """Z (T×T, float64, rows: the task stepped on, columns: the task whose loss is measured).

    ``params`` holds every parameter the loss depends on (and buffers), ``shared`` names the
    ones a task step changes. NaN where task i had no loss (no row) or L_j(θ) is 0 or not finite.
    """
    missing = [n for n in shared if n not in params]
    if missing:
        raise ShapeError(f"shared parameters {missing[:3]} are not in the parameters given")
    base_params = {n: (v.detach().requires_grad_(True) if n in shared else v.detach()) for n, v in params.items()}
    with torch.enable_grad():
        base = losses_at(base_params)
    t = len(tasks)
    z = torch.full((t, t), math.nan, dtype=torch.float64)
    base_values = [None if base.get(task) is None else float(base[task].detach()) for task in tasks]  # type: ignore[union-attr]
    inputs = [base_params[n] for n in shared]
    for i, task in enumerate(tasks):
        loss = base.get(task)
        if loss is None or not math.isfinite(base_values[i] or 0.0):
            continue
        grads = torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True)
        grad_map = {n: (g if g is not None else torch.zeros_like(p)) for n, g, p in zip(shared, grads, inputs, strict=True)}
        stepped = update({n: base_params[n].detach() for n in shared}, grad_map)
        with torch.no_grad():
            after = losses_at({**{n: v.detach() for n, v in base_params.items()}, **stepped})
        for j, other in enumerate(tasks):
            before, new = base_values[j], after.get(other)
            if before is None or new is None or before == 0 or not math.isfinite(before):
                continue
            z[i, j] = 1.0 - float(new) / before
    return z


def model_losses(model: nn.Module, batches: Sequence[Any], tasks: Sequence[str], *, seed: int = 0) -> LossesAt:
    """Per-task losses of a polytask MultiTaskModel on a step's batches at given parameters.

    Every call reseeds the random stream with ``seed`` (dropout masks repeat between calls) and
    runs on clones of the buffers, so BatchNorm's running statistics stay the model's own.
    """
    from torch.func import functional_call

    buffers = dict(model.named_buffers())
    device = next((p.device for p in model.parameters()), torch.device("cpu"))

    def losses_at(params: Mapping[str, Tensor]) -> dict[str, Tensor | None]:
        state = {**{n: b.clone() for n, b in buffers.items()}, **params}
        out: dict[str, Tensor | None] = {}
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for batch in batches:
                wanted = [t for t in tasks if t in batch.targets and t not in out]
                if not wanted:
                    continue
                outputs = functional_call(model, state, (batch.x,), {"tasks": wanted, "task": batch.source})
                for t in wanted:
                    out[t] = model.tasks[t].loss(outputs[t], batch.targets[t], batch.masks.get(t))
        return out

    return losses_at


class AffinityStats:
    """Mean Z per epoch and overall, each pair averaged over the affinity steps where it was defined."""

    def __init__(self, tasks: Sequence[str]) -> None:
        self.tasks = list(tasks)
        self.index = {t: i for i, t in enumerate(self.tasks)}
        self.epochs: dict[int, dict[str, Any]] = {}

    def add(self, epoch: int, tasks: Sequence[str], z: Tensor) -> None:
        if z.shape != (len(tasks), len(tasks)):
            raise ShapeError(f"an affinity matrix for {len(tasks)} tasks must be {len(tasks)}×{len(tasks)}; "
                             f"found {tuple(z.shape)}")
        n = len(self.tasks)
        acc = self.epochs.setdefault(epoch, {"sum": [[0.0] * n for _ in range(n)], "count": [[0] * n for _ in range(n)],
                                             "steps": 0})
        acc["steps"] += 1
        for a, ta in enumerate(tasks):
            for b, tb in enumerate(tasks):
                value = float(z[a, b])
                if math.isfinite(value):
                    acc["sum"][self.index[ta]][self.index[tb]] += value
                    acc["count"][self.index[ta]][self.index[tb]] += 1

    def _mean(self, accs: list[dict[str, Any]]) -> dict[str, Any]:
        n = len(self.tasks)
        matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
        for i in range(n):
            for j in range(n):
                c = sum(a["count"][i][j] for a in accs)
                matrix[i][j] = sum(a["sum"][i][j] for a in accs) / c if c else None
        return {"mean": matrix, "steps": sum(a["steps"] for a in accs)}

    def summary(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "per_epoch": {str(e): self._mean([a]) for e, a in sorted(self.epochs.items())},
                "overall": self._mean(list(self.epochs.values()))}

    def state_dict(self) -> dict[str, Any]:
        return {"epochs": {str(k): v for k, v in self.epochs.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epochs = {int(k): dict(v) for k, v in state["epochs"].items()}
