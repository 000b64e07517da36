"""GREAT: gradient adversarial training with a task discriminator on the task gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.optim.adam import adam

from polytask.core.errors import InvalidParameterError
from polytask.methods._lazy_state import LazyStateMixin
from polytask.methods._weighting import PerTaskMethod
from polytask.methods.base import Step, Update, check_positive, register

_PARAMS = ("hidden_weight", "hidden_bias", "out_weight", "out_bias")


@register("great")
class GREAT(LazyStateMixin, PerTaskMethod):
    """Gradient adversarial training — Sinha, Chen, Badrinarayanan & Rabinovich, "Gradient
    Adversarial Training of Neural Networks", arXiv:1806.08028, 2018 (GREAT, multi-task setting).

    The paper trains an auxiliary network to tell which task a gradient tensor came from and
    makes the main network its adversary through gradient reversal, so that the task gradients
    become statistically indistinguishable. Our formulation on the shared parameters θ:

    - the discriminator D (one hidden ReLU layer of ``hidden`` units, one logit per task) sees
      the unit task gradients uᵢ = gᵢ/‖gᵢ‖ and minimises L_D = mean_i CE(D(uᵢ), i) with one
      Adam step (``lr``) per training step; the update's weights are 1 for every task;
    - its direction moves every task gradient up L_D (the reversal), along the part aᵢ of
      ∇_{uᵢ} L_D orthogonal to uᵢ: d = Σᵢ gᵢ + ``strength`` · Σᵢ ‖gᵢ‖ aᵢ/‖aᵢ‖.

    D's input layer has P inputs (P = |θ|): it is created at the first step from
    ``step.generator``, hence the ``last_shared`` default of ``compare``. D's parameters are
    ``nn.Parameter`` s with ``requires_grad=False`` (the trainer's optimizer leaves them alone;
    they are updated only here); their Adam moments and step count are buffers, so
    ``state_dict`` resumes exactly.

    Departures:
        The paper feeds D the per-sample gradients w.r.t. the shared feature map and sends the
        reversed signal into θ by second-order back-propagation (through gradient alignment
        layers); the engine hands us only the batch gradients J on θ, so we use J's rows and a
        first-order step in gradient space.
    """

    needs = "jacobian"
    # the discriminator reads whole gradient vectors (its first layer is hidden × |θ|): on all
    # shared parameters of a real encoder that is gigabytes, so GREAT defaults to the last layer
    compare = "last_shared"
    stateful = True

    def __init__(self, *, strength: float = 0.1, hidden: int = 32, lr: float = 1e-3) -> None:
        super().__init__()
        self.strength = check_positive("GREAT", "strength", strength, allow_zero=True)
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise InvalidParameterError(f"`hidden` of `GREAT` must be an int >= 1; found {hidden!r}")
        self.hidden = hidden
        self.lr = check_positive("GREAT", "lr", lr)
        for name in _PARAMS:
            setattr(self, name, nn.Parameter(torch.empty(0), requires_grad=False))
            self.register_buffer(f"{name}_avg", torch.empty(0))
            self.register_buffer(f"{name}_sq", torch.empty(0))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_loss", torch.full((), math.nan))
        self._remember(strength=strength, hidden=hidden, lr=lr)

    def reset_state(self, num_tasks: int) -> None:
        for name in _PARAMS:
            getattr(self, name).data = torch.empty(0)
        self.count.zero_()
        self.last_loss.fill_(math.nan)

    def discriminator_loss(self, step: Step, params: list[Tensor] | None = None, units: Tensor | None = None) -> Tensor:
        """L_D on the step's unit task gradients (or on ``units``), with D's parameters or ``params``."""
        w1, b1, w2, b2 = params if params is not None else [getattr(self, n) for n in _PARAMS]
        u = _unit(self._jacobian(step)) if units is None else units
        logits = F.linear(torch.relu(F.linear(u, w1.to(u.dtype), b1.to(u.dtype))), w2.to(u.dtype), b2.to(u.dtype))
        return F.cross_entropy(logits, self.index(step))

    def update(self, step: Step) -> Update:
        j = self._jacobian(step)
        norms = j.norm(dim=1)
        # the unit gradients once, for D's step and for the reversal (each would make its own T×P copy)
        units = j / norms.clamp(min=torch.finfo(j.dtype).tiny)[:, None]
        self._advance(step, units)
        direction = j.sum(dim=0)
        if self.strength != 0:  # Σᵢ ‖gᵢ‖ aᵢ/‖aᵢ‖ as one product with the norms: no T×P temporary
            direction.add_(norms @ self.adversarial(step, units), alpha=self.strength)
        return Update(torch.ones_like(step.losses), direction=direction)

    def _advance(self, step: Step, units: Tensor | None = None) -> None:
        self.index(step)  # sets up lazily with the step's tasks
        self._materialise(step)
        params = [getattr(self, n).detach().requires_grad_() for n in _PARAMS]
        with torch.enable_grad():
            loss = self.discriminator_loss(step, params, units)
            grads = torch.autograd.grad(loss, params)
        # torch's own Adam, in place and fused: D's first layer is hidden × |θ| (8.4 M numbers on the
        # benchmark MLP's last layer), where Adam's out-of-place arithmetic made ~30 temporaries of
        # that size, 300 ms and 200 MB a step. Its step counts are float tensors it advances itself:
        # made from ``count`` (the state that is saved) and dropped.
        weights = [getattr(self, n).data for n in _PARAMS]
        device = weights[0].device
        adam(
            weights, list(grads), [getattr(self, f"{n}_avg") for n in _PARAMS], [getattr(self, f"{n}_sq") for n in _PARAMS],
            [], [torch.tensor(float(self.count), device=device) for _ in _PARAMS],
            fused=weights[0].dtype in (torch.float32, torch.float64) and device.type in ("cpu", "cuda"),
            amsgrad=False, beta1=0.9, beta2=0.999, lr=self.lr, weight_decay=0.0, eps=1e-8, maximize=False)
        self.count += 1
        self.last_loss.fill_(float(loss.detach()))

    def adversarial(self, step: Step, units: Tensor | None = None) -> Tensor:
        """aᵢ/‖aᵢ‖ (T×P): the unit directions in which each uᵢ most increases L_D (``units``: the
        step's uᵢ, when already formed)."""
        u = (_unit(self._jacobian(step)) if units is None else units).detach().requires_grad_()
        params = [getattr(self, n).detach() for n in _PARAMS]
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.discriminator_loss(step, params, u), u)
        u = u.detach()
        # aᵢ = ∇ − (∇·uᵢ) uᵢ and its unit vector, in place in the gradient (the row dots one by one:
        # grad * u would be one more T×P temporary, and a batched product was 3× slower than both)
        along = torch.stack([torch.dot(g, v) for g, v in zip(grad, u, strict=True)]).reshape(-1, 1)
        tangent = grad.addcmul_(u, along, value=-1)
        return tangent.div_(tangent.norm(dim=1, keepdim=True).clamp(min=torch.finfo(tangent.dtype).tiny))

    def _materialise(self, step: Step) -> None:
        size = self._jacobian(step).shape[1]
        if self.hidden_weight.shape == (self.hidden, size):
            return
        if int(self.count) > 0:
            raise InvalidParameterError(f"`GREAT`'s discriminator was built for {self.hidden_weight.shape[1]} "
                                        f"parameters; the step has {size}")
        shapes = {"hidden_weight": (self.hidden, size), "hidden_bias": (self.hidden,),
                  "out_weight": (len(self.all_tasks), self.hidden), "out_bias": (len(self.all_tasks),)}
        for name, shape in shapes.items():
            bound = 1 / math.sqrt(size if name.startswith("hidden") else self.hidden)
            init = (torch.rand(shape, generator=step.generator) * 2 - 1) * bound
            getattr(self, name).data = init.to(step.losses.device)
            setattr(self, f"{name}_avg", torch.zeros(shape, device=step.losses.device))
            setattr(self, f"{name}_sq", torch.zeros(shape, device=step.losses.device))

    @staticmethod
    def _jacobian(step: Step) -> Tensor:
        assert step.jacobian is not None  # Method.forward checked
        return step.jacobian.detach()


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny)
