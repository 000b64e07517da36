"""Nash-MTL: the Nash bargaining solution over the task gradients, Gw = 1/w."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.methods._gramian_qp import as_float64, to_step
from polytask.methods.base import Method, Step, check_positive, register

_RIDGE = 1e-10


@register("nash_mtl")
class NashMTL(Method):
    """Multi-task learning as a bargaining game — Navon et al., ICML 2022, Algorithm 1.

    The weights solve Gw = 1/w, w > 0 (the bargaining solution of their Section 3; then ‖Σ wᵢ gᵢ‖² = wᵀGw = T). Instead of
    the paper's sequence of convex programs, this solves it exactly with damped Newton on the
    strictly convex, self-concordant f(w) = ½wᵀGw − Σ log wᵢ, whose stationary point is Gw = 1/w;
    a 1e-10 relative ridge on G keeps it well posed when the gradients are linearly dependent.

    (The official code divides G by ‖G‖_F for conditioning and multiplies the factor back into its
    constraint, so it solves the same equation; here G is scaled by its mean diagonal instead.)
    ``max_norm`` > 0 rescales w so that ‖Σ wᵢ gᵢ‖ ≤ max_norm (the official code clips
    the shared gradient only; here the heads' gradients scale with it). ``update_weights_every``
    re-solves every k calls and reuses the last weights in between (while the same tasks are
    active); the cached weights and the call counter are buffers, so resuming is exact.
    """

    needs = "gramian"
    stateful = True

    def __init__(self, *, max_norm: float = 1.0, update_weights_every: int = 1) -> None:
        super().__init__()
        self.max_norm = check_positive("NashMTL", "max_norm", max_norm, allow_zero=True)
        every = update_weights_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidParameterError(
                f"`update_weights_every` of `NashMTL` must be an int >= 1; found {update_weights_every!r}")
        self.update_weights_every = update_weights_every
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))
        self.register_buffer("last_weights", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("last_active", torch.zeros(0, dtype=torch.bool))
        self._remember(max_norm=max_norm, update_weights_every=update_weights_every)

    def setup(self, tasks: Sequence[str], *, sizes=None, static_weights=None) -> None:
        super().setup(tasks)
        self.last_weights = torch.zeros(len(self.all_tasks), dtype=torch.float64)
        self.last_active = torch.zeros(len(self.all_tasks), dtype=torch.bool)

    def weights(self, step: Step) -> Tensor:
        g = as_float64(step.gramian, type(self).__name__)
        tasks = getattr(self, "all_tasks", ())
        unknown = [t for t in step.tasks if t not in tasks]
        if unknown:
            raise InvalidParameterError(f"`NashMTL` got task(s) {unknown} not given to setup(); tasks: {list(tasks)}")
        active = torch.tensor([t in step.tasks for t in tasks], dtype=torch.bool)
        order = [tasks.index(t) for t in step.tasks]
        reuse = int(self.calls) % self.update_weights_every != 0 and bool((active == self.last_active).all())
        if reuse:
            w = self.last_weights[order]
        else:
            w = solve_nash(g)
            self.last_weights.zero_()
            self.last_weights[order] = w
            self.last_active.copy_(active)
        self.calls += 1
        if self.max_norm > 0:
            norm = float(w @ g @ w) ** 0.5
            if norm > self.max_norm:
                w = w * (self.max_norm / norm)
        return to_step(w, step.gramian)


def solve_nash(g: Tensor, iters: int = 500) -> Tensor:
    """w > 0 with Gw = 1/w: damped Newton on f(w) = ½wᵀGw − Σ log wᵢ (in float64)."""
    n = len(g)
    s = float(g.diagonal().mean())
    s = s if s > 0 else 1.0
    a = g / s + _RIDGE * torch.eye(n, dtype=g.dtype)  # solve A u = 1/u, then w = u / √s
    u = a.diagonal().rsqrt()
    u = u * (n / float(u @ a @ u)) ** 0.5  # best multiple of the diagonal solution
    for _ in range(iters):
        grad = a @ u - 1 / u
        delta = -torch.linalg.solve(a + torch.diag(u.pow(-2)), grad)
        decrement = float(-(grad @ delta)) ** 0.5
        if decrement < 1e-12:
            break
        u = u + (1.0 if decrement < 0.25 else 1.0 / (1.0 + decrement)) * delta
    return u / s**0.5
