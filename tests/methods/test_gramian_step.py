"""The engine's step for a plain Gramian method (``Engine._gramian_step``: the passes accumulated
into J's rows and the heads' ``.grad``, G read onto the host by ``host_gramian``, the solvers'
floats from ``Step.gramian_values``) gives what the general step gives, bit for bit, whether that
step's passes accumulate too or (as before) return the gradients to be copied into J. Where it
cannot be exact (hooks on a parameter, a J too large) the general step runs; θ's ``.grad`` is put
back when a pass fails."""

from __future__ import annotations

import importlib

import pytest
import torch

from polytask.bench.small import mlp_problem
from polytask.engine.jacobian import ACCUMULATE_MAX_ENTRIES, accumulate_rows, gramian, host_gramian, row_views
from polytask.methods import METHODS, Step
from polytask.methods.base import example_method

engine_module = importlib.import_module("polytask.engine.backward")
Engine = engine_module.Engine


class General(Engine):
    """The engine with its plain Gramian step switched off: every step takes the general path."""

    @property
    def _plain_gramian(self) -> bool:
        return False


def _plain_methods() -> list[str]:
    names = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        if cls.needs == "gramian" and not getattr(cls, "lookahead", False) and getattr(cls, "batch_parts", 1) == 1:
            names.append(name)
    return names


def _engines(name: str, n_tasks: int = 4):
    """Two copies of one small model, each with its engine on ``name``: the plain step's and the general one's."""
    pairs = []
    for kind in (Engine, General):
        problem = mlp_problem(6, 16, n_tasks, 12, seed=3)
        method = example_method(name)
        method.setup(problem.tasks, sizes={t: 10 * (i + 1) for i, t in enumerate(problem.tasks)})
        engine = kind(method, problem.model.shared_parameters(), compare="shared", params=problem.model.parameters(),
                      seed=5)
        pairs.append((problem, engine))
    return pairs


def _run(problem, engine, index: int):
    """One step with its twists: step 2 drops a task, step 3 scales the losses, step 4 accumulates onto
    the gradients of a first backward; then an SGD step so that the next one starts elsewhere."""
    model = problem.model
    model.zero_grad(set_to_none=True)
    reports = []
    for repeat in range(2 if index == 4 else 1):
        _, losses = problem.losses()
        if index == 2:
            losses = {**losses, problem.tasks[1]: None}
        reports.append(engine.backward(losses, scale=4.0 if index == 3 else 1.0))
        del repeat
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.05 * p.grad
    return reports


def _assert_same_grads(ours, theirs, where) -> None:
    for (name, p), q in zip(ours.model.named_parameters(), theirs.model.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), (where, name)
        if p.grad is not None:
            assert torch.equal(p.grad, q.grad), (where, name)


@pytest.mark.parametrize("copies", [False, True], ids=["general", "copying-passes"])
@pytest.mark.parametrize("name", _plain_methods())
def test_plain_gramian_step_is_the_general_step_bit_for_bit(name, copies, monkeypatch):
    taken = []
    plain = Engine._gramian_step

    def spy(self, *args, **kwargs):
        report = plain(self, *args, **kwargs)
        taken.append(report is not None)
        return report

    monkeypatch.setattr(Engine, "_gramian_step", spy)
    (fast_problem, fast), (general_problem, general) = _engines(name)
    if not fast._plain_gramian:
        pytest.skip(f"{name} weights the heads: the general step is its only step")
    if copies:  # the general step as it was: passes that return the gradients, copied into J
        real, theirs = engine_module.accumulates, {id(p) for p in general_problem.model.parameters()}
        monkeypatch.setattr(engine_module, "accumulates",
                            lambda tensors, jacobian: real(tensors, jacobian) and not any(id(t) in theirs for t in tensors))
    for index in range(6):
        ours, theirs = _run(fast_problem, fast, index), _run(general_problem, general, index)
        for a, b in zip(ours, theirs, strict=True):
            assert a.weights == b.weights, (name, index)
            assert a.fallback == b.fallback
            assert torch.equal(a.gramian, b.gramian), (name, index)
        _assert_same_grads(fast_problem, general_problem, (name, index))
    assert any(taken), f"{name}: the plain step never ran"


def test_hooked_parameter_takes_the_general_step_with_the_same_hook_calls():
    (fast_problem, fast), (general_problem, general) = _engines("mgda")
    calls = {"fast": 0, "general": 0}
    for key, problem in (("fast", fast_problem), ("general", general_problem)):
        first = next(iter(problem.model.shared_parameters()))

        def hook(grad, key=key):
            calls[key] += 1
            return grad * 2  # a hook that changes the gradient: the update must see it in both

        first.register_hook(hook)
    for index in range(3):
        _run(fast_problem, fast, index), _run(general_problem, general, index)
        _assert_same_grads(fast_problem, general_problem, index)
    assert calls["fast"] == calls["general"] > 0


def test_large_jacobian_is_written_by_copies():
    problem = mlp_problem(128, 512, 4, 8)
    engine = Engine("mgda", problem.model.shared_parameters(), compare="shared", params=problem.model.parameters(),
                    gramian="jacobian")
    engine.backward(problem.losses()[1])
    assert engine._kept_jacobian.numel() > ACCUMULATE_MAX_ENTRIES
    assert "_rows" not in engine.__dict__  # no row views: the rows were copied


def test_failed_pass_puts_back_the_gradients_it_pointed_at_j():
    class Fails(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("this pass fails")

    w = torch.nn.Parameter(torch.randn(3))
    b = torch.nn.Parameter(torch.randn(2))
    before = torch.full((2,), 7.0)
    b.grad = before
    losses = [(w * 2).sum() + b.sum(), Fails.apply(w).sum() + b.sum()]
    j = torch.zeros(2, 5)
    with pytest.raises(RuntimeError, match="this pass fails"):
        accumulate_rows(losses, [w, b], row_views(j, [w.shape, b.shape]), free_graph=True)
    assert w.grad is None and b.grad is before
    assert torch.equal(j[0], torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0]))  # the first pass's row was written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_host_gramian_is_gramian_bit_for_bit(dtype):
    g = torch.Generator().manual_seed(0)
    read = 0
    for rows, width in [(4, 7), (4, 20992), (5, 100), (8, 1000), (2, 1), (9, 50), (3, 40000)]:
        for _ in range(4):
            jacobian = (torch.randn(rows, width, generator=g, dtype=dtype)
                        * torch.rand(rows, 1, generator=g, dtype=dtype) * 10)
            ours, values = host_gramian(jacobian)
            assert torch.equal(ours, gramian(jacobian)), (rows, width)
            if values is not None:
                read += 1
                assert values == ours.tolist()
    assert read > 0
    big = torch.full((2, 3), torch.finfo(dtype).max ** 0.5 / 1.5, dtype=dtype)  # entries above max / 2
    for bad in (big, torch.tensor([[1.0, float("nan")], [2.0, 3.0]], dtype=dtype),
                torch.tensor([[1.0, float("inf")], [2.0, 3.0]], dtype=dtype)):
        ours, values = host_gramian(bad)
        assert values is None
        assert torch.equal(ours, gramian(bad)) or (ours.isnan().any() and gramian(bad).isnan().any())


def test_step_gramian_values_follow_the_gramian():
    g = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    step = Step(tasks=("a", "b"), losses=torch.ones(2))
    step.gramian = g
    assert step.gramian_values() == [[2.0, 1.0], [1.0, 3.0]]
    g.mul_(2)  # written in place: read again
    assert step.gramian_values() == [[4.0, 2.0], [2.0, 6.0]]
    step.gramian = torch.eye(2)
    assert step.gramian_values() == [[1.0, 0.0], [0.0, 1.0]]
    step.give_gramian(g, [[4.0, 2.0], [2.0, 6.0]])
    assert step.gramian is g and step.gramian_values() == [[4.0, 2.0], [2.0, 6.0]]
    with pytest.raises(Exception, match="no task Gramian"):
        Step(tasks=("a",), losses=torch.ones(1)).gramian_values()
