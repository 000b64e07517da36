"""Gradient health: per-task and per-layer gradient norms, task conflict, and what to do when
gradients vanish, explode or stop being finite."""

from __future__ import annotations

import math
import statistics
import warnings
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from polytask.core.errors import PolytaskError
from polytask.core.options import Options

Policy = Literal["warn", "skip", "stop"]
POLICIES = ("warn", "skip", "stop")


class GradientHealthWarning(UserWarning):
    """A gradient problem that the run's policy lets training continue through."""


class GradientHealthError(PolytaskError):
    """Training stopped by the ``stop`` policy; the message names the task and layer."""


class NonFiniteLossError(GradientHealthError):
    """A task's loss became NaN or infinite (and the policy is ``stop``)."""


class HealthOptions(Options):
    """When to look and how to react (YAML ``health:``).

    Attributes:
        every: per-task norms, per-layer norms and task cosines are logged every ``every`` steps
            (0: never; the task Jacobian is computed on those steps).
        policy: on a non-finite loss or gradient, or an exploding gradient: ``warn`` (non-finite
            steps are still never applied), ``skip`` (drop the step; optimizer and method state
            stay untouched) or ``stop`` (raise, keeping the last checkpoint).
        vanish_threshold / vanish_patience: a layer whose gradient norm stays below the threshold
            for that many consecutive logged steps is reported as vanishing.
        explode_threshold: a total gradient norm above it is exploding.
        explode_factor: so is a norm more than this factor above the median of the last 20 steps
            that trained the same set of tasks (steps of different task sets have different
            gradient scales: per-task data sets, samplers, schedulers).
    """

    every: int = Field(0, ge=0, strict=True)
    policy: Policy = "stop"
    vanish_threshold: float = Field(1e-7, gt=0)
    vanish_patience: int = Field(3, ge=1, strict=True)
    explode_threshold: float = Field(1e4, gt=0)
    explode_factor: float = Field(100.0, gt=0)


#: the dtypes whose per-tensor norms are combined on the host, and the largest total each keeps
#: finite: √(largest float), past which the sum of squares overflows in that dtype
_HOST_LIMITS = {dtype: math.sqrt(torch.finfo(dtype).max) for dtype in (torch.float32, torch.float64)}


class GradientMonitor:
    """Watches each step's gradients; the trainer asks it whether to apply the step."""

    def __init__(self, model: nn.Module, settings: HealthOptions) -> None:
        self.settings = settings
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        #: recent total norms per set of trained tasks (key: the task names joined by ",")
        self.recent: dict[str, deque[float]] = {}
        self.low_counts = {n: 0 for n, _ in self.named}
        self.reported_vanishing: set[str] = set()
        self.rows: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._params = [p for _, p in self.named]
        self._keys: dict[tuple[str, ...], str] = {}  # task tuple -> its key in ``recent``
        self._norm_key: tuple[Any, ...] | None = None
        self._one_group = False
        self._host_limit: float | None = None  # set when the norms are combined on the host

    def wants_gramian(self, step: int) -> bool:
        return self.settings.every > 0 and step % self.settings.every == 0

    def non_finite_losses(self, step: int, bad_tasks: Sequence[str]) -> bool:
        """Report tasks whose loss is NaN/inf; True when training should skip the step."""
        return self._react(step, "non_finite_loss", f"loss of task(s) {list(bad_tasks)} is not finite",
                           tasks=list(bad_tasks), never_apply=True)

    def check(self, step: int, tasks: Sequence[str], gramian: Tensor | None, task_norms: Tensor | None = None) -> bool:
        """Inspect ``.grad`` after the backward; True when the step must not be applied. ``task_norms``
        (‖gᵢ‖) name the culprit task where there is no Gramian (the report's, of a Jacobian method)."""
        # every step needs only the total norm (one fused kernel, one sync); per-layer norms are
        # computed on logging steps and when something is wrong
        grads = [p.grad for p in self._params if p.grad is not None]
        total = self._total_norm(grads) if grads else 0.0
        if gramian is not None:
            task_norms = gramian.diagonal().clamp_min(0).sqrt()
        logging = self.wants_gramian(step)
        layer_norms = self._layer_norms() if logging or not math.isfinite(total) else None
        if logging:
            self._log(step, tasks, layer_norms, total, gramian, task_norms)
        if not math.isfinite(total):
            layers = [n for (n, _), v in zip(self.named, layer_norms.tolist()) if not math.isfinite(v)]
            bad_tasks = ([t for t, v in zip(tasks, task_norms.tolist()) if not math.isfinite(v)]
                         if task_norms is not None else [])
            return self._react(step, "non_finite_gradient", f"gradient is not finite in layer(s) {layers[:5]}",
                               tasks=bad_tasks, layers=layers, never_apply=True)
        tasks = tuple(tasks)  # (the report's tuple itself: no copy)
        key = self._keys.get(tasks)
        if key is None:
            key = self._keys[tasks] = ",".join(tasks)
        recent = self.recent.setdefault(key, deque(maxlen=20))
        factor = self.settings.explode_factor
        # the median only matters when the total exceeds factor × the smallest recent norm
        median = (statistics.median(recent) if len(recent) >= 5 and total > factor * min(recent) else None)
        recent.append(total)
        if total > self.settings.explode_threshold or (median and total > factor * median):
            layer_norms = self._layer_norms() if layer_norms is None else layer_norms
            top = max(zip(layer_norms.tolist(), (n for n, _ in self.named)))[1]
            culprit = ([tasks[int(task_norms.argmax())]] if task_norms is not None and len(tasks) else [])
            limit = (f"threshold {self.settings.explode_threshold:g}" if total > self.settings.explode_threshold
                     else f"{self.settings.explode_factor:g}× the recent median {median:.3g}")
            return self._react(step, "exploding_gradient", f"gradient norm {total:.3g} exceeds {limit}; largest in "
                               f"layer '{top}'", tasks=culprit, layers=[top])
        return False

    def _total_norm(self, grads: list[Tensor]) -> float:
        """‖(g₁, …, gₙ)‖₂, the norm of the per-tensor norms (``torch._foreach_norm``), as
        ``torch.nn.utils.get_total_norm`` computes it but without its grouping by device and dtype
        when there is one group: that bookkeeping cost half as much as the norms on a small model.

        Departures: on the CPU the per-tensor norms are combined in float64 by ``math.hypot``
        (get_total_norm stacks them and takes a float32 norm, two more tensor operations, a
        twentieth of a small model's step): the value agrees to float32 round-off and is
        deterministic. A total whose square overflows the gradients' dtype is reported as inf, as
        get_total_norm's reduction gives it. On an accelerator (and for half-precision gradients)
        they are combined on the device, so one value crosses to the host, not n.
        """
        first = grads[0]
        key = (first.device, first.dtype, len(grads))  # whether the list is one group, checked when this changes
        if self._norm_key != key:
            self._norm_key = key
            self._one_group = not any(g.is_sparse or g.device != first.device or g.dtype != first.dtype for g in grads)
            self._host_limit = _HOST_LIMITS.get(first.dtype) if first.device.type == "cpu" else None
        if not self._one_group:
            return float(torch.nn.utils.get_total_norm(grads, foreach=True))
        norms = torch._foreach_norm(grads)
        if self._host_limit is not None:
            total = math.hypot(*[float(n) for n in norms])
            # get_total_norm's reduction in the gradients' dtype overflows once the sum of squares
            # leaves its range; such a gradient is reported as non-finite here too
            return math.inf if total > self._host_limit else total  # nan stays nan
        return float(torch.linalg.vector_norm(torch.stack(norms)))

    def _layer_norms(self) -> Tensor:
        """Gradient norm of every parameter tensor (0 where it has no gradient)."""
        if not self.named:
            return torch.zeros(0)
        return torch.stack([p.grad.detach().norm() if p.grad is not None else torch.zeros((), device=p.device)
                            for _, p in self.named])

    def _log(self, step: int, tasks: Sequence[str], layer_norms: Tensor, total: float, gramian: Tensor | None,
             task_norms: Tensor | None) -> None:
        self.rows.append({"step": step, "kind": "total_norm", "name": "all", "value": total})
        for (name, _), value in zip(self.named, layer_norms.tolist()):
            self.rows.append({"step": step, "kind": "layer_norm", "name": name, "value": value})
            if value < self.settings.vanish_threshold:
                self.low_counts[name] += 1
                if self.low_counts[name] >= self.settings.vanish_patience and name not in self.reported_vanishing:
                    self.reported_vanishing.add(name)
                    self._event(step, "vanishing_gradient",
                                f"gradient norm of layer '{name}' stayed below {self.settings.vanish_threshold:g} "
                                f"for {self.low_counts[name]} logged steps", [], [name])
            else:
                self.low_counts[name] = 0
        if gramian is None or task_norms is None:
            return
        for task, value in zip(tasks, task_norms.tolist()):
            self.rows.append({"step": step, "kind": "task_norm", "name": task, "value": value})
        cosine = gramian / (task_norms[:, None] * task_norms[None, :]).clamp_min(1e-30)
        for i in range(len(tasks)):
            for j in range(i + 1, len(tasks)):
                self.rows.append({"step": step, "kind": "cosine", "name": f"{tasks[i]}~{tasks[j]}",
                                  "value": float(cosine[i, j])})

    def _react(self, step: int, kind: str, message: str, *, tasks: Sequence[str] = (), layers: Sequence[str] = (),
               never_apply: bool = False) -> bool:
        who = f" (task(s) {list(tasks)})" if tasks else ""
        full = f"step {step}: {message}{who}"
        if self.settings.policy == "stop":
            self._event(step, kind, message, tasks, layers, warn=False)
            error = NonFiniteLossError if kind == "non_finite_loss" else GradientHealthError
            advice = ("fix the data or the loss that produced it" if kind == "non_finite_loss" else
                      "lower optim.lr, bring large regression targets to unit scale, raise health.explode_threshold "
                      "/ health.explode_factor if such norms are normal for this model, or set health.policy: skip")
            raise error(f"{full}; training stopped by health policy 'stop' ({advice})")
        self._event(step, kind, message, tasks, layers)
        return never_apply or self.settings.policy == "skip"

    def _event(self, step: int, kind: str, message: str, tasks: Sequence[str], layers: Sequence[str],
               warn: bool = True) -> None:
        self.events.append({"step": step, "kind": kind, "tasks": list(tasks), "layers": list(layers),
                            "message": message})
        if warn:
            who = f" (task(s) {list(tasks)})" if tasks else ""
            warnings.warn(f"step {step}: {message}{who}", GradientHealthWarning, stacklevel=3)

    def state_dict(self) -> dict[str, Any]:
        return {"recent": {k: list(v) for k, v in self.recent.items()}, "low_counts": dict(self.low_counts),
                "reported": sorted(self.reported_vanishing), "rows": list(self.rows), "events": list(self.events)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.recent = {k: deque(v, maxlen=20) for k, v in state["recent"].items()}
        self.low_counts.update(state["low_counts"])
        self.reported_vanishing = set(state["reported"])
        self.rows, self.events = list(state["rows"]), list(state["events"])
