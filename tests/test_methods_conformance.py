"""Conformance of every registered method: shape, finiteness, task permutation, state round trip,
determinism under a seed and steps on a subset of the tasks.

Methods are built with their defaults. Each step carries random positive losses, a random
Jacobian J (T×P) and G = J Jᵀ (J itself only when the method needs it).
"""

from __future__ import annotations

import copy

import pytest
import torch

from polytask.methods import METHODS, Method, Step

TASKS = ("a", "b", "c", "d")
SIZES = {t: 100 * (i + 1) for i, t in enumerate(TASKS)}
P = 7
#: (active tasks, epoch) of the steps fed in order; subsets include a single task (round robin).
SCHEDULE = [(TASKS, 0), (("c", "a"), 0), (("b", "c", "d"), 1), (("d",), 1), (TASKS, 2), (("a", "d", "b"), 2)]
#: Parameters for the entries that have required ones (every other entry runs on its defaults).
REQUIRED = {"warmup": {"inner": "dwa", "steps": 3}}


def build(name: str) -> Method:
    method = METHODS.create(name, **REQUIRED.get(name, {}))
    method.setup(TASKS, sizes=SIZES)
    return method


def data(index: int, tasks: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Losses and Jacobian of step ``index``: the same values for a task whatever the order."""
    gen = torch.Generator().manual_seed(1000 + index)
    losses = torch.rand(len(TASKS), generator=gen) + 0.1
    jac = torch.randn(len(TASKS), P, generator=gen)
    rows = [TASKS.index(t) for t in tasks]
    return losses[rows], jac[rows]


def make_step(method: Method, index: int, tasks: tuple[str, ...], epoch: int, gen: torch.Generator) -> Step:
    losses, jac = data(index, tasks)
    return Step(tasks=tasks, losses=losses, index=index, epoch=epoch, generator=gen, gramian=jac @ jac.T,
                jacobian=jac if method.needs == "jacobian" else None)


def output(method: Method, step: Step) -> torch.Tensor:
    return method.direction(step) if method.returns_direction else method.weights(step)


def run(method: Method, schedule, gen: torch.Generator, start: int = 0) -> list[torch.Tensor]:
    """Feed the steps (end-of-epoch hook between epochs) and return the detached outputs."""
    outs = []
    for k, (tasks, epoch) in enumerate(schedule, start=start):
        if k > 0 and epoch != SCHEDULE[k - 1][1]:
            method.on_epoch_end(epoch - 1, {t: 1.0 / (1 + k + i) for i, t in enumerate(TASKS)})
        outs.append(output(method, make_step(method, k, tasks, epoch, gen)).detach().clone())
    return outs


NAMES = METHODS.names()


@pytest.mark.parametrize("name", NAMES)
def test_shape_and_finite(name):
    method = build(name)
    assert repr(method)
    for (tasks, _), out in zip(SCHEDULE, run(method, SCHEDULE, torch.Generator().manual_seed(0))):
        expected = (P,) if method.returns_direction else (len(tasks),)
        assert out.shape == expected, f"{name}: shape {tuple(out.shape)} for tasks {tasks}"
        assert torch.isfinite(out).all(), f"{name}: non-finite output {out} for tasks {tasks}"


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_under_seed(name):
    first = run(build(name), SCHEDULE, torch.Generator().manual_seed(3))
    second = run(build(name), SCHEDULE, torch.Generator().manual_seed(3))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    split = 4
    original = build(name)
    gen = torch.Generator().manual_seed(5)
    run(original, SCHEDULE[:split], gen)
    state = copy.deepcopy(original.state_dict())
    gen_state = gen.get_state()
    expected = run(original, SCHEDULE[split:], gen, start=split)

    restored = build(name)
    restored.load_state_dict(state)
    gen2 = torch.Generator()
    gen2.set_state(gen_state)
    for a, b in zip(expected, run(restored, SCHEDULE[split:], gen2, start=split)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_task_permutation(name):
    """Permuting the order of the active tasks permutes the weights (and keeps a direction)."""
    plain, shuffled = build(name), build(name)
    if not getattr(plain, "permutation_equivariant", True):
        pytest.skip(f"{name} draws a random task order (permutation_equivariant = False)")
    perm = [2, 0, 3, 1]
    permuted = [(tuple(tasks[i] for i in perm) if len(tasks) == 4 else tasks[::-1], e) for tasks, e in SCHEDULE]
    outs = run(plain, SCHEDULE, torch.Generator().manual_seed(9))
    outs_perm = run(shuffled, permuted, torch.Generator().manual_seed(9))
    for (tasks, _), (ptasks, _), a, b in zip(SCHEDULE, permuted, outs, outs_perm):
        if not plain.returns_direction:
            a = a[[tasks.index(t) for t in ptasks]]
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=lambda m, ts=ptasks: f"{name} on {ts}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_subset_of_tasks(name):
    """Weights of a subset step are keyed by the active tasks only; the full set still works after."""
    method = build(name)
    gen = torch.Generator().manual_seed(11)
    for k, tasks in enumerate([("b",), ("d", "a"), ("a", "b", "c"), TASKS]):
        out = output(method, make_step(method, k, tasks, 0, gen))
        assert out.shape == ((P,) if method.returns_direction else (len(tasks),))
        assert torch.isfinite(out).all()
