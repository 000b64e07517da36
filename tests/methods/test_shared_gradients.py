"""Every method on graphs where autograd hands one gradient tensor around without copying it.

Autograd passes a gradient on unchanged where it can: an addition hands both operands the same
tensor (z = θ₁ + θ₂), a view hands back a view of its input's gradient, and a leaf takes the gradient
it is given as its ``.grad`` when nothing else holds it. The engine's fast paths work on gradients
in place (J's blocks unscaled, the heads' per-task gradients summed) and seed backward passes with
tensors they keep, so each of those shapes once gave wrong gradients. Here every registered method
trains four steps on such a graph (every task; one task without a loss; the tasks in another order;
every task again, which meets what the first step left in the engine's caches) and on the same
graph with a copy (``x * 1.0``) at each of those places, zeroing the gradients in place between
steps, and the two must give the same gradients on every route: the default one, the vmapped
passes, unweighted and weighted heads, a loss scale, J too large to accumulate, per-task clipping,
the last shared layer, the shared representation, reused weights, and the no-J Gramian's route,
which falls back to J with its warning here (the parameters are added outside any layer it knows).
A route a method refuses, with its error, is skipped with that error.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.engine.backward import Engine
from polytask.engine.jacobian import ACCUMULATE_MAX_ENTRIES
from polytask.methods import METHODS

from .helpers import GRADIENT, NAMES, build

TASKS = ("a", "b", "c", "d", "e")
#: engine options of each route, its loss scale, whether it is a route of gradient methods only and
#: whether θ holds a tensor large enough that J (> 2²⁰ entries) is not accumulated by the passes
#: themselves (the loop route then sums the heads' per-task gradients)
ROUTES: dict[str, tuple[dict, float, bool, bool]] = {
    "default": ({}, 1.0, False, False),
    "scaled": ({}, 4.0, False, False),
    "batched": ({"jacobian": "batched"}, 1.0, True, False),
    "batched-scaled": ({"jacobian": "batched"}, 4.0, True, False),
    "unweighted": ({"heads": "unweighted"}, 1.0, True, False),
    "large-unweighted": ({"heads": "unweighted", "jacobian": "loop"}, 1.0, True, True),
    "large-weighted": ({"heads": "weighted", "jacobian": "loop"}, 1.0, True, True),
    "large-batched-scaled": ({"jacobian": "batched"}, 4.0, True, True),
    "task-clip": ({"task_clip": 1.0}, 1.0, False, False),
    "task-clip-scaled": ({"task_clip": 1.0}, 4.0, False, False),
    "last-shared": ({"compare": "last_shared"}, 1.0, True, False),
    "autogram": ({"gramian": "autogram"}, 1.0, True, False),
    "autogram-scaled": ({"gramian": "autogram"}, 4.0, True, False),
    "every-2": ({"every": 2}, 1.0, True, False),
    "features": ({"compare": "features"}, 1.0, True, False),
    "features-scaled": ({"compare": "features"}, 4.0, True, False),
    "features-unweighted": ({"compare": "features", "heads": "unweighted"}, 1.0, True, False),
}
LARGE = ACCUMULATE_MAX_ENTRIES // len(TASKS) + 1


def _losses(theta: list[Tensor], heads: list[Tensor], clean: bool, step: int) -> tuple[dict[str, Tensor], Tensor]:
    t1, t2, t3, *large = theta
    h1, h2, h3, h4 = heads

    def one(x: Tensor) -> Tensor:
        return x * 1.0 if clean else x

    z = one(t1) + one(t2)  # θ₁ and θ₂ reached only through the sum: one gradient for both
    losses = {
        "a": ((z * z).sum() + (one(h1) + one(h2)).sum()) * (1.0 + 0.1 * step),  # two heads share one too
        "b": (one(t3) + one(h1)).sum() * 2.0 + z.sum(),  # a θ tensor and a head
        "c": (z * torch.tensor([1.0, 3.0])).sum() + one(h3).view(()) * 1.5,
        "d": one(h3).view(()) + (t3 ** 2).sum(),  # a view of a leaf, as it is
        "e": one(h4).view(()) + t3.sum() * 0.5,  # h₄ reached only so: it may take its seed as .grad
    }
    if large:  # J too large to accumulate; the large tensor takes no part in the shapes above
        losses["b"] = losses["b"] + (large[0] * 1e-3).sum()
    return losses, z


def _train(name: str, route: str, clean: bool) -> list[list[Tensor | None]]:
    options, scale, _, large = ROUTES[route]
    theta = [nn.Parameter(torch.tensor(v)) for v in ([1.0, 2.0], [0.5, 0.25], [0.3, 0.7])]
    if large:
        theta.append(nn.Parameter(torch.linspace(-1.0, 1.0, LARGE)))
    heads = [nn.Parameter(torch.tensor(v)) for v in ([0.2, -0.1], [0.4, 0.3], 0.6, 0.9)]
    params = [*theta, *heads]
    method = build(name, TASKS)
    try:
        engine = Engine(method, theta, last_shared_params=[theta[2]], params=params, seed=3, **options)
    except InvalidParameterError as refused:  # a route the method cannot take: its error says why
        pytest.skip(str(refused))
    seen = []
    for step in range(4):
        losses, z = _losses(theta, heads, clean, step)

        def outer(moved: dict[int, Tensor], batch: str = "outer", step: int = step) -> dict[str, Tensor]:
            return _losses([moved[id(p)] for p in theta], heads, clean, step + (batch == "outer"))[0]

        lookahead = outer if METHODS.get(name).lookahead else None
        if step == 1:  # a task without a loss this step
            losses["c"] = None  # type: ignore[assignment]
        if step == 2:  # the tasks in another order
            losses = dict(reversed(losses.items()))
        if "autogram" in route and step == 0:  # parameters added outside any layer: the no-J Gramian says so
            with pytest.warns(UserWarning, match="cannot be used for this model.*computing the task Jacobian instead"):
                engine.backward(losses, features=[z], scale=scale, lookahead=lookahead)
        else:
            engine.backward(losses, features=[z], scale=scale, lookahead=lookahead)
        seen.append([None if p.grad is None else p.grad.clone() / scale for p in [*params, *method.parameters()]])
        for p in [*params, *method.parameters()]:
            if p.grad is not None:
                p.grad.zero_()  # zero_grad(set_to_none=False): in place, into whatever .grad is
    return seen


CASES = [(name, route) for name in NAMES for route, (_, _, gradient_only, _) in ROUTES.items()
         if not gradient_only or name in GRADIENT]


@pytest.mark.parametrize(("name", "route"), CASES)
def test_gradients_a_pass_shares_are_those_of_copies(name, route):
    if "unweighted" in route and METHODS.get(name).heads not in (None, "unweighted"):
        pytest.skip(f"{name} declares heads={METHODS.get(name).heads!r}")
    clean, shared = _train(name, route, clean=True), _train(name, route, clean=False)
    for step, (want, got) in enumerate(zip(clean, shared, strict=True)):
        for k, (a, b) in enumerate(zip(want, got, strict=True)):
            assert (a is None) == (b is None), (step, k)
            if a is not None:
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=f"step {step}, tensor {k}")
