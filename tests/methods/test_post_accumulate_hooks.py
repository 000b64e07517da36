"""Post-accumulate-grad hooks run once per step on every parameter a step gives a gradient, on every route.

torch's optimiser-in-backward recipe (``p.register_post_accumulate_grad_hook``: each parameter's
optimiser step runs as soon as its gradient is accumulated) relies on autograd running the hook once
a backward has written ``.grad``. The engine writes θ's d = Jᵀw, and on the fused routes the heads'
shares, itself, not through an accumulating backward: those hooks never ran, and a Gramian method
left the shared layers untrained without a word. Here every registered method trains three steps of
a small model with the optimiser's steps taken in such hooks, and the same model with
``optimizer.step()`` after the engine's step; the two must hold the same parameters, bit for bit,
and every hook must have run exactly once on every step its parameter got a gradient.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from polytask.core.errors import InvalidParameterError
from polytask.engine.backward import Engine
from polytask.methods import METHODS

from .helpers import GRADIENT, NAMES, Tiny, build

TASKS = ("t0", "t1", "t2")
#: engine options of each route and whether only gradient methods take it
ROUTES: dict[str, tuple[dict, bool]] = {
    "default": ({}, False),
    "jacobian": ({"gramian": "jacobian"}, True),
    "autogram": ({"gramian": "autogram"}, True),
    "batched": ({"jacobian": "batched"}, True),
    "unweighted": ({"heads": "unweighted"}, True),
    "weighted": ({"heads": "weighted"}, True),
    "last-shared": ({"compare": "last_shared"}, True),
    "features": ({"compare": "features"}, True),
    "every-2": ({"every": 2}, True),
    "task-clip": ({"task_clip": 0.5}, False),
}
LR = 0.05


def _train(name: str, options: dict, in_backward: bool, declared: bool = True) -> tuple[list[torch.Tensor], list[Counter]]:
    model = Tiny(TASKS, seed=2)
    method = build(name, TASKS)
    params = list(model.parameters())
    try:
        engine = Engine(method, model.shared(), last_shared_params=model.last_shared(),
                        params=params if declared else None, seed=4, **options)
    except InvalidParameterError as refused:  # a route the method cannot take: its error says why
        pytest.skip(str(refused))
    own = torch.optim.SGD(method.parameters(), lr=LR) if list(method.parameters()) else None
    optimizers = {id(p): torch.optim.SGD([p], lr=LR, momentum=0.5) for p in params}
    calls: Counter = Counter()
    if in_backward:
        for k, p in enumerate(params):
            def hook(tensor: torch.Tensor, k: int = k) -> None:
                calls[k] += 1
                optimizers[id(tensor)].step()
                tensor.grad = None
            p.register_post_accumulate_grad_hook(hook)
    per_step = []
    for step in range(3):
        z, losses = model.losses(seed=step)
        if step == 1:  # a task without a loss: its head gets no gradient and no hook
            losses["t1"] = None  # type: ignore[assignment]
        outer = (lambda moved, batch="outer", s=step: model.losses(seed=s + 1)[1]) if METHODS.get(name).lookahead \
            else None
        calls.clear()
        engine.backward(losses, features=[z], lookahead=outer)
        if not in_backward:
            for k, p in enumerate(params):
                if p.grad is not None:
                    calls[k] += 1
                    optimizers[id(p)].step()
                    p.grad = None
        per_step.append(Counter(calls))
        if own is not None:
            own.step()
            own.zero_grad()
    return [p.detach().clone() for p in params], per_step


CASES = [(name, route) for name in NAMES for route, (_, gradient_only) in ROUTES.items()
         if not gradient_only or name in GRADIENT]


@pytest.mark.filterwarnings("ignore:.*computing the task Jacobian instead:UserWarning")
@pytest.mark.parametrize("declared", [True, False], ids=["params", "no params"])
@pytest.mark.parametrize(("name", "route"), CASES)
def test_hooks_take_the_optimisers_step_as_after_the_step(name, route, declared):
    """Also for an engine not told the heads (no ``params``): it finds them where the step walks its
    graph (the fused passes ran no head's hook; the splits between θ and the heads ran a hook that
    stepped its head in place before a later pass through it)."""
    options = ROUTES[route][0]
    if options.get("heads") == "unweighted" and METHODS.get(name).heads not in (None, "unweighted"):
        pytest.skip(f"{name} declares heads={METHODS.get(name).heads!r}")
    if options.get("heads") == "weighted" and METHODS.get(name).heads not in (None, "weighted"):
        pytest.skip(f"{name} declares heads={METHODS.get(name).heads!r}")
    want, want_calls = _train(name, options, in_backward=False, declared=declared)
    got, got_calls = _train(name, options, in_backward=True, declared=declared)
    assert got_calls == want_calls  # once on every step a parameter has a gradient, never twice
    assert want_calls[1][6] == want_calls[1][7] == 0  # t1's head (its weight and bias) had no gradient then
    for k, (a, b) in enumerate(zip(want, got, strict=True)):
        assert torch.equal(a, b), f"parameter {k}: {(a - b).abs().max().item()}"


@pytest.mark.parametrize("options", [{}, {"heads": "weighted"}, {"gramian": "autogram"}],
                         ids=["default", "weighted", "autogram"])
def test_a_layer_unfrozen_now_and_a_head_an_extra_loss_reaches_run_their_hooks_once(options):
    """A shared layer unfrozen before this step has its hook held and run too (θ was re-derived after
    the hooks were taken: no call); a head that the soft-sharing penalty (``extra_loss``) also reaches,
    on an engine without ``params``, runs its hook once (twice: inside the penalty's backward, then at
    the end)."""
    model = Tiny(TASKS, seed=2)
    model.encoder[0].requires_grad_(False)
    engine = Engine(build("upgrad", TASKS), model.shared(), seed=4, **options)
    calls: Counter = Counter()

    def count(params) -> None:
        for name, p in params:
            p.register_post_accumulate_grad_hook(lambda tensor, name=name: calls.update([name]))

    count((n, p) for n, p in model.named_parameters() if p.requires_grad)
    for step in range(2):
        if step == 1:
            model.encoder[0].requires_grad_(True)
            count(("encoder.0." + n, p) for n, p in model.encoder[0].named_parameters())
        z, losses = model.losses(seed=step)
        calls.clear()
        penalty = (model.heads["t0"].weight ** 2).sum() * 0.1
        engine.backward(losses, features=[z], extra_loss=penalty)
        assert all(n == 1 for n in calls.values()), calls
        assert ("encoder.0.weight" in calls) == (step == 1)
        assert calls["heads.t0.weight"] == 1
        model.zero_grad(set_to_none=True)
