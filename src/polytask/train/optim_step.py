"""``optimizer.step()`` for torch's Adam and AdamW on the CPU, without torch's per-step Python.

Why: on a small model (a tabular or RL network) torch's ``Optimizer.step`` spends about 20 µs of
Python around an update whose fused kernel takes 20 µs: a profiler range and the hook loops
(``Optimizer.profile_hook_step``), the grad-mode wrapper, ``Adam._init_group`` (per parameter: a
complex-dtype test, a sparse test, the lazy-state test, five list appends) and the functional
``adam``'s grouping of the tensors by device and dtype. Inside the demo model's training step
(`polytask bench overhead`), where the caches are cold, it cost more than that: the Trainer took
1.12–1.14× a hand-written loop's time with torch's step and 1.02–1.05× with this one.

Callers (the Trainer, the multi-task SAC agent) call :func:`step` with their optimiser, which
keeps one :class:`AdamStep` per live optimiser. :class:`AdamStep` builds the lists
``_init_group`` builds and hands them, with each group's own settings, to the function torch's
step ends in: for a fused group whose parameters share one dtype and device (so that
``_fused_adam``'s grouping is the identity) and whose ``lr`` and ``betas`` are Python floats,
``torch._fused_adam_`` / ``torch._fused_adamw_`` after the ``_foreach_add_`` of the step counts,
as ``_fused_adam`` calls them; for any other group torch's functional ``torch.optim.adam.adam``
with the group's settings. The update is torch's to the bit
(``tests/test_optim_step.py`` compares parameters and state with ``optimizer.step()`` over Adam and
AdamW, fused, foreach and the single-tensor loop, amsgrad, maximize, weight decay, two groups,
parameters without a gradient, an LR schedule and a loaded state).

It is taken only where that is exactly what ``optimizer.step()`` would do: the optimiser is a plain
``torch.optim.Adam`` or ``AdamW`` (no subclass; no patched ``step`` but an LR scheduler's step
tracker, whose only effect, ``optimizer._opt_called = True``, is reproduced), no step hook (the
optimiser's own or torch's global ones), no group ``differentiable`` or ``capturable``, every
parameter with a gradient on the CPU, dense, real and with its state made (the first step, which
makes it, is torch's own), and no gradient scaler attached (``grad_scale`` / ``found_inf``).
Anything else returns False and the caller calls ``optimizer.step()``.

Departures from torch's public API: the fused kernels ``torch._fused_adam_`` / ``_fused_adamw_``
and the hook registries read (``_optimizer_step_pre_hooks``, ``_optimizer_step_post_hooks`` and
the module's global ones) are private to torch. A registry that is missing refuses the fast
step; a kernel whose signature changed fails loudly, and the bit-for-bit test above says so.
"""

from __future__ import annotations

import inspect
import weakref

import torch
import torch.optim.optimizer as torch_optimizer
from torch import Tensor
from torch.optim.adam import adam

#: the optimisers this step takes: Adam, and AdamW where torch implements it as Adam with
#: ``decoupled_weight_decay`` (recent torch; older ones gave AdamW a step of its own); none where the
#: functional ``adam`` takes other settings than the ones handed to it here
_ARGUMENTS = set(inspect.signature(adam).parameters)
_PLAIN: tuple[type, ...] = (
    () if not {"decoupled_weight_decay", "has_complex", "fused"} <= _ARGUMENTS
    else (torch.optim.Adam, torch.optim.AdamW) if issubclass(torch.optim.AdamW, torch.optim.Adam)
    else (torch.optim.Adam,))
_MISSING = object()
#: each optimiser's AdamStep, dropped with the optimiser
_STEPS: weakref.WeakKeyDictionary[torch.optim.Optimizer, AdamStep] = weakref.WeakKeyDictionary()


def step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, by :class:`AdamStep` where that is exact. Each optimiser's ``AdamStep``
    (its per-group tests) is kept while the optimiser lives, so a caller holds nothing that could go
    stale when its optimiser is replaced."""
    fast = _STEPS.get(optimizer)
    if fast is None:
        fast = _STEPS[optimizer] = AdamStep(optimizer)
    fast.step()


def clear_grads(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.zero_grad(set_to_none=True)``: every optimised parameter's ``.grad`` set to None.

    Why not torch's call: it wraps that loop in a profiler range and a TorchDynamo guard, about
    20 µs a step on the demo model (2% of its step). An optimiser class with a ``zero_grad`` of its
    own gets it called."""
    if type(optimizer).zero_grad is not torch.optim.Optimizer.zero_grad:
        optimizer.zero_grad(set_to_none=True)
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _hooked(optimizer: torch.optim.Optimizer) -> bool:
    """Whether a step hook would run (True also where torch's registries are not where expected)."""
    own = (getattr(optimizer, "_optimizer_step_pre_hooks", _MISSING), getattr(optimizer, "_optimizer_step_post_hooks", _MISSING))
    shared = (getattr(torch_optimizer, "_global_optimizer_pre_hooks", _MISSING),
              getattr(torch_optimizer, "_global_optimizer_post_hooks", _MISSING))
    return any(hooks is _MISSING or len(hooks) for hooks in (*own, *shared))  # type: ignore[arg-type]


class AdamStep:
    """``optimizer.step()`` for one optimiser, by torch's own update functions where that is exact.

    Per step it reads each parameter's state dict afresh (``load_state_dict`` replaces them, and so
    may a user's code); the per-parameter tests of ``_init_group`` that depend on the parameter only
    (dense gradient, real dtype, on the CPU) and whether the group shares one dtype and device are
    made once per param group, while every parameter of the group has a gradient."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        # a weak reference: :func:`step` keeps this object in a map weakly keyed by the optimiser,
        # which a strong one would keep alive for ever
        self._optimizer = weakref.ref(optimizer)
        #: per param group (by id, the group kept so that the id is not reused): the group, its
        #: parameter list and whether they share one dtype and device, once they passed the tests
        self._tested: dict[int, tuple[dict, list[Tensor], bool]] = {}

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        optimizer = self._optimizer()
        assert optimizer is not None, "the optimiser was deleted"
        return optimizer

    def step(self) -> None:
        """``optimizer.step()``: this update where it is exact, else torch's own call."""
        if not self():
            self.optimizer.step()

    def __call__(self) -> bool:
        """Apply the update; False (nothing done) where it would not be exactly ``optimizer.step()``."""
        optimizer = self.optimizer
        if type(optimizer) not in _PLAIN or getattr(optimizer, "grad_scale", None) is not None \
                or getattr(optimizer, "found_inf", None) is not None:
            return False
        patched = vars(optimizer).get("step")
        if (patched is not None and not getattr(patched, "_wrapped_by_lr_sched", False)) or _hooked(optimizer):
            return False
        plans = []
        for group in optimizer.param_groups:
            if group["differentiable"] or group["capturable"]:
                return False
            plan = self._plan(group)
            if plan is None:
                return False
            plans.append((group, *plan))
        # as ``Adam.step`` runs under its ``_use_grad_for_differentiable`` (differentiable False)
        with torch.no_grad():
            for group, params, grads, states, uniform in plans:
                beta1, beta2 = group["betas"]
                amsgrad, lr = group["amsgrad"], group["lr"]
                exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
                max_exp_avg_sqs = [s["max_exp_avg_sq"] for s in states] if amsgrad else []
                steps = [s["step"] for s in states]
                if group["fused"] and uniform and type(lr) is float and type(beta1) is float and type(beta2) is float:
                    if params:  # ``_fused_adam`` on one device and dtype: its grouping is the identity
                        torch._foreach_add_(steps, 1)
                        kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
                        kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad=amsgrad, lr=lr,
                               beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                               maximize=group["maximize"], grad_scale=None, found_inf=None)
                    continue
                adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, amsgrad=amsgrad, has_complex=False,
                     beta1=beta1, beta2=beta2, lr=lr, weight_decay=group["weight_decay"], eps=group["eps"],
                     maximize=group["maximize"], foreach=group["foreach"], capturable=False, differentiable=False,
                     fused=group["fused"], grad_scale=None, found_inf=None,
                     decoupled_weight_decay=group["decoupled_weight_decay"])
        if patched is not None:
            optimizer._opt_called = True  # type: ignore[attr-defined]  # what the LR scheduler's tracker records
        return True

    def _plan(self, group: dict) -> tuple[list[Tensor], list[Tensor], list[dict], bool] | None:
        """The group's parameters with a gradient, their gradients, their state dicts and whether
        they share one dtype and device; None where one of them has no state yet (torch's step makes
        it) or fails a test of ``_init_group`` (dense, real, on the CPU: tested once per group while
        every parameter has a gradient, as these change only with the parameter itself)."""
        params = group["params"]
        grads = [g for p in params if (g := p.grad) is not None]
        # read every step, not kept: ``load_state_dict`` replaces them, and so may the user's code
        state = self.optimizer.state
        if len(grads) == len(params):
            states = list(map(state.get, params))  # ``state`` is a defaultdict: indexing would make entries
            if not all(states):
                return None
            tested = self._tested.get(id(group))
            if tested is None or tested[0] is not group or tested[1] is not params:
                if not self._passes(params, grads):
                    return None
                tested = self._tested[id(group)] = (group, params, _uniform(params))
            return params, grads, states, tested[2]
        with_grad = [p for p in params if p.grad is not None]
        states = list(map(state.get, with_grad))
        if not all(states) or not self._passes(with_grad, grads):
            return None
        return with_grad, grads, states, _uniform(with_grad)

    @staticmethod
    def _passes(params: list[Tensor], grads: list[Tensor]) -> bool:
        return not any(g.is_sparse or p.is_complex() or p.device.type != "cpu" for p, g in zip(params, grads, strict=True))


def _uniform(params: list[Tensor]) -> bool:
    """Whether the parameters share one dtype and one device."""
    return len({(p.dtype, p.device) for p in params}) <= 1
