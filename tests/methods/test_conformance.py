"""Conformance of every registry entry to the method contract, and to the properties its paper claims.

Each entry is built with its ``example_params`` and fed ``properties.SCHEDULE`` (random positive
losses, a random Jacobian J and G = J Jᵀ, subsets of the tasks, epochs): weights of shape (T,),
a direction (when given) of shape (P,), all finite; identical under the same seed; a state dict
that resumes exactly; weights permuted with the tasks (unless the class says otherwise). The
paper properties of ``properties.CLAIMS`` run through the one set of checks in ``properties``.
Methods declared ``stateful = False`` are pure (index, seed and history play no part), and the
one-shot ``polytask.backward`` accepts exactly those.
"""

from __future__ import annotations

import copy

import pytest
import torch

import polytask as pt
from polytask.core.errors import InvalidParameterError
from polytask.methods import METHODS

from . import properties
from .helpers import NAMES, build, hard_sharing, make_step, model_losses
from .properties import SCHEDULE, TASKS, P, feed


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny tensors: one intra-op thread is faster on a shared machine."""


def test_every_entry_declares_its_paper_properties():
    assert set(properties.CLAIMS) == set(NAMES), "a registry entry is missing from properties.CLAIMS (or is stale)"
    for name, claims in properties.CLAIMS.items():
        assert set(claims) <= set(properties.CHECKS), f"{name}: unknown property in {set(claims)}"
        assert all(c.source for c in claims.values()), name


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_finite(name):
    method = build(name, TASKS)
    assert repr(method)
    for (tasks, _), out in zip(SCHEDULE, feed(method), strict=True):
        assert out.weights.shape == (len(tasks),), f"{name}: weights of shape {tuple(out.weights.shape)} for {tasks}"
        assert torch.isfinite(out.weights).all(), f"{name}: non-finite weights {out.weights} for {tasks}"
        if out.direction is not None:
            assert out.direction.shape == (P,), f"{name}: direction of shape {tuple(out.direction.shape)}"
            assert torch.isfinite(out.direction).all(), f"{name}: non-finite direction for {tasks}"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name):
    """Two runs with the same seed agree exactly (a step's draws come from stream(seed, index))."""
    for a, b in zip(feed(build(name, TASKS), seed=3), feed(build(name, TASKS), seed=3), strict=True):
        torch.testing.assert_close(a.weights, b.weights, rtol=0, atol=0)
        if a.direction is not None:
            torch.testing.assert_close(a.direction, b.direction, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    """A fresh method loading the state of one that ran continues exactly as it would have: the
    state dict is all there is (the random stream is a function of seed and index)."""
    split = 4
    original = build(name, TASKS)
    feed(original, SCHEDULE[:split], seed=5)
    state = copy.deepcopy(original.state_dict())
    expected = feed(original, SCHEDULE[split:], seed=5, start=split)
    restored = build(name, TASKS)
    restored.load_state_dict(state)
    for a, b in zip(expected, feed(restored, SCHEDULE[split:], seed=5, start=split), strict=True):
        torch.testing.assert_close(b.weights, a.weights, rtol=0, atol=0)
        if a.direction is not None:
            torch.testing.assert_close(b.direction, a.direction, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_task_permutation(name):
    """Permuting the order of the active tasks permutes the weights (and keeps a direction)."""
    if not build(name).permutation_equivariant:  # an instance's: Warmup takes its inner method's
        pytest.skip(f"{name} draws a random task order (permutation_equivariant = False)")
    properties.check_permutation_equivariant(lambda: build(name, TASKS))


@pytest.mark.parametrize("name", NAMES)
def test_subset_of_tasks(name):
    """Weights of a subset step are keyed by the active tasks only; the full set still works after."""
    method = build(name, TASKS)
    gen = torch.Generator().manual_seed(11)
    for k, tasks in enumerate([("b",), ("d", "a"), ("a", "b", "c"), TASKS]):
        j = torch.randn(len(tasks), P, generator=gen, dtype=torch.float64)
        out = method(make_step(method, j, torch.rand(len(tasks), dtype=torch.float64) + 0.1, tasks=tasks, index=k))
        assert out.weights.shape == (len(tasks),) and torch.isfinite(out.weights).all()
        assert out.direction is None or (out.direction.shape == (P,) and torch.isfinite(out.direction).all())


@pytest.mark.parametrize("name,prop", properties.claimed())
def test_paper_property(name, prop):
    """Each property that the entry's paper claims (properties.CLAIMS), by the shared checks."""
    properties.check(name, prop)


# --- purity and the one-shot backward --------------------------------------------------------------

STATELESS = [n for n in NAMES if not METHODS.get(n).stateful]
STATEFUL = [n for n in NAMES if METHODS.get(n).stateful]


@pytest.mark.parametrize("name", STATELESS)
def test_stateless_methods_are_pure(name):
    """``stateful = False`` means the weights are a function of the step's inputs only: the same
    Step at another index and seed, and after other steps (and epochs), gives identical weights."""
    losses, j = properties.schedule_data(0, TASKS)
    method = build(name, TASKS)
    first = method(make_step(method, j, losses, tasks=TASKS, index=0, seed=0))
    feed(method, SCHEDULE, seed=4, start=1)
    for index, seed in ((0, 0), (7, 0), (3, 12345)):
        again = method(make_step(method, j, losses, tasks=TASKS, index=index, seed=seed, epoch=index))
        torch.testing.assert_close(again.weights, first.weights, rtol=0, atol=0,
                                   msg=lambda m, i=index: f"{name} at index {i} after other steps: {m}")
        assert (again.direction is None) == (first.direction is None)
        if first.direction is not None:
            torch.testing.assert_close(again.direction, first.direction, rtol=0, atol=0)
        assert (again.penalty is None) == (first.penalty is None)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(8, 4, generator=gen), torch.randn(8, 3, generator=gen)


def _one_shot(method):
    model, tasks = hard_sharing(3)
    z, losses = model_losses(model, tasks, *_data())
    return model, pt.backward(losses, model.shared_parameters(), method, features=[z])


@pytest.mark.parametrize("name", STATEFUL)
def test_one_shot_backward_refuses_stateful_methods(name):
    with pytest.raises(InvalidParameterError) as error:
        _one_shot(build(name))
    message = str(error.value)
    assert f"'{name}' keeps state between steps or draws random numbers" in message
    assert f"engine = polytask.Engine({name!r}, model.shared_parameters())" in message
    assert "report = engine.backward(losses)" in message


@pytest.mark.parametrize("name", STATELESS)
def test_one_shot_backward_runs_stateless_methods(name):
    """The one-shot call leaves what a fresh Engine's first step leaves, and reports its weights."""
    tasks = ("t0", "t1", "t2")
    model, report = _one_shot(build(name, tasks))
    got = [p.grad.clone() for p in model.parameters()]
    assert report.tasks == tasks and set(report.weights) == set(tasks)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert any(p.grad.abs().sum() > 0 for p in model.shared_parameters())
    model.zero_grad(set_to_none=True)
    z, losses = model_losses(model, [pt.Task(t, kind="regression") for t in tasks], *_data())
    expected = pt.Engine(build(name, tasks), model.shared_parameters()).backward(losses, features=[z])
    assert report.weights == pytest.approx(expected.weights, rel=1e-6, abs=1e-9)
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)
