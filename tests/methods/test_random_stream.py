"""Random methods draw from the engine's counter-based stream: step k of an engine with seed s draws
from ``stream(s, k)`` and from nothing else, so the draws change every step, are the same for the
same (seed, index) whatever happened before, and a resumed engine draws what the first one would."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from polytask.engine import Engine
from polytask.methods import Step, get_method
from polytask.methods.base import stream

TASKS = ("a", "b", "c", "d")
#: task gradients with conflicts (negative inner products), so that PCGrad's order matters
G = torch.tensor([[1.0, 0.5, -0.3, 0.0, 0.2], [-0.9, 0.6, 0.1, 0.4, -0.2],
                  [0.2, -1.0, 0.7, -0.3, 0.1], [-0.4, -0.2, -0.8, 0.9, 0.5]])


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny tensors: one intra-op thread is faster on a shared machine."""


def linear_losses(theta: nn.Parameter) -> dict[str, torch.Tensor]:
    """Lᵢ = gᵢᵀθ + 2: the task Jacobian on θ is exactly G."""
    return {t: G[i] @ theta + 2.0 for i, t in enumerate(TASKS)}


def engine_steps(method: str, steps: int, seed: int = 0) -> tuple[list, list[torch.Tensor]]:
    """Reports and θ gradients of ``steps`` consecutive steps of one engine (θ does not move)."""
    theta = nn.Parameter(torch.zeros(G.shape[1]))
    engine = Engine(method, [theta], seed=seed)
    reports, grads = [], []
    for _ in range(steps):
        theta.grad = None
        reports.append(engine.backward(linear_losses(theta)))
        grads.append(theta.grad.clone())
    return reports, grads


def test_stream_is_a_function_of_seed_and_index():
    draw = [torch.rand(4, generator=stream(seed, index)) for seed, index in ((0, 0), (0, 1), (1, 0), (0, 0))]
    assert torch.equal(draw[0], draw[3])
    assert not torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    assert not torch.equal(torch.rand(4, generator=stream(0, 1)), torch.rand(4, generator=stream(1, 0)))


def test_a_step_builds_its_generator_on_first_use_and_keeps_a_given_one():
    step = Step(tasks=("a", "b"), losses=torch.ones(2), index=4, seed=9)
    assert step.__dict__["_generator"] is None  # nothing built until a method draws
    first = torch.rand(5, generator=step.generator)
    second = torch.rand(5, generator=step.generator)  # the same generator, advanced
    reference = stream(9, 4)
    assert torch.equal(first, torch.rand(5, generator=reference))
    assert torch.equal(second, torch.rand(5, generator=reference))
    given = torch.Generator().manual_seed(1)
    assert Step(tasks=("a",), losses=torch.ones(1), generator=given).generator is given


def test_rlw_weights_change_every_step_and_follow_the_stream():
    seed = 3
    reports, _ = engine_steps("rlw", 4, seed=seed)
    weights = [torch.tensor([r.weights[t] for t in TASKS], dtype=torch.float64) for r in reports]
    for k, w in enumerate(weights):
        assert reports[k].index == k
        block, row = divmod(k, 64)  # a block of 64 steps' draws from the stream's negative indices
        z = torch.randn(64, len(TASKS), generator=stream(seed, -1 - block), dtype=torch.float64)[row]
        torch.testing.assert_close(w, len(TASKS) * torch.softmax(z, 0), rtol=1e-6, atol=1e-7)
    assert all(not torch.allclose(a, b) for a, b in zip(weights, weights[1:]))
    again, _ = engine_steps("rlw", 4, seed=seed)
    assert [r.weights for r in again] == [r.weights for r in reports]
    other, _ = engine_steps("rlw", 1, seed=seed + 1)
    assert other[0].weights != reports[0].weights


def test_rlw_draws_across_a_block_boundary_follow_the_stream():
    """Steps 62–66 take rows of two blocks of draws; a second engine started at 64 draws the same."""
    theta = nn.Parameter(torch.zeros(G.shape[1]))
    engine, later = Engine("rlw", [theta], seed=5), Engine("rlw", [theta], seed=5)
    engine.index, later.index = 62, 64
    reports = [engine.backward(linear_losses(theta)) for _ in range(5)]
    for k, report in zip(range(62, 67), reports, strict=True):
        block, row = divmod(k, 64)
        z = torch.randn(64, len(TASKS), generator=stream(5, -1 - block), dtype=torch.float64)[row]
        expected = len(TASKS) * torch.softmax(z, 0)
        got = torch.tensor([report.weights[t] for t in TASKS], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert later.backward(linear_losses(theta)).weights == reports[2].weights


def pcgrad_by_hand(j: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Yu et al.'s Algorithm 1 on the gradient vectors: for each task, one random order of all tasks."""
    total = torch.zeros_like(j[0])
    for i in range(len(j)):
        g = j[i].clone()
        for k in torch.randperm(len(j), generator=generator).tolist():
            dot = g @ j[k]
            if k != i and dot < 0:
                g = g - dot / (j[k] @ j[k]) * j[k]
        total += g
    return total


def test_pcgrad_orders_follow_the_stream():
    seed = 5
    _, grads = engine_steps("pcgrad", 4, seed=seed)
    j = G.double()
    for k, got in enumerate(grads):
        torch.testing.assert_close(got.double(), pcgrad_by_hand(j, stream(seed, k)), rtol=1e-5, atol=1e-6)
    # the orders matter for G and change with the step
    assert len({tuple(torch.round(g, decimals=4).tolist()) for g in grads}) > 1


def graddrop_by_hand(j: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Chen et al.'s Algorithm 1 (leak 0): per coordinate, one uniform draw against the sign purity."""
    purity = 0.5 * (1 + j.sum(0) / j.abs().sum(0))
    u = torch.rand(j.shape[1], generator=generator, dtype=j.dtype)
    keep = ((purity > u) & (j > 0)) | ((purity < u) & (j < 0))
    return (keep.to(j.dtype) * j).sum(0)


def test_graddrop_draws_differ_per_step_and_are_reproducible():
    seed = 7
    reports, grads = engine_steps("graddrop", 6, seed=seed)
    for k, got in enumerate(grads):
        torch.testing.assert_close(got, graddrop_by_hand(G, stream(seed, k)), rtol=1e-6, atol=1e-7)
        assert reports[k].weights == {t: 1.0 for t in TASKS}
    assert len({tuple(g.tolist()) for g in grads}) > 1  # the masks are redrawn every step
    _, again = engine_steps("graddrop", 6, seed=seed)
    assert all(torch.equal(a, b) for a, b in zip(grads, again, strict=True))
    _, other = engine_steps("graddrop", 6, seed=seed + 1)
    assert any(not torch.equal(a, b) for a, b in zip(grads, other, strict=True))


def test_graddrop_in_column_blocks_is_the_masked_sum_whatever_the_block(monkeypatch):
    """J is taken in blocks of columns (and U drawn block by block): every block size gives the same
    direction bit for bit, Algorithm 1's Σᵢ M_ik g_ik to round-off (zero columns and zero entries
    included), and exactly where every kept gradient is positive."""
    from polytask.methods import graddrop

    j = torch.randn(4, 300, generator=torch.Generator().manual_seed(5))
    j[:, :3] = 0.0
    j[1, 3:9] = 0.0
    j[:, 9:40] = j[:, 9:40].abs()  # columns without a negative gradient
    got = {}
    for columns in (1 << 16, 7, 1):
        monkeypatch.setattr(graddrop, "COLUMNS", columns)
        got[columns] = get_method("graddrop")(Step(tasks=("a", "b", "c", "d"), losses=torch.ones(4), gramian=j @ j.T,
                                                   jacobian=j, generator=torch.Generator().manual_seed(2))).direction
    expected = graddrop_by_hand(j, torch.Generator().manual_seed(2))
    expected[:3] = 0.0  # the by-hand purity is 0/0 there; the method's P = ½ keeps nothing either
    assert torch.equal(got[7], got[1 << 16]) and torch.equal(got[1], got[1 << 16])
    torch.testing.assert_close(got[1], expected, rtol=0, atol=1e-6)
    assert torch.equal(got[1][:40], expected[:40])


def test_graddrop_step_draws_depend_on_seed_and_index_only():
    """At the method level: the same (seed, index) gives the same masks, another seed or index others."""
    method = get_method("graddrop", leak=0.2)
    j = torch.randn(3, 200, generator=torch.Generator().manual_seed(7), dtype=torch.float64)

    def at(seed: int, index: int) -> torch.Tensor:
        return method(Step(tasks=("a", "b", "c"), losses=torch.ones(3, dtype=j.dtype), index=index, seed=seed,
                           gramian=j @ j.T, jacobian=j)).direction

    first = at(3, 0)
    assert torch.equal(first, at(3, 0))
    assert not torch.equal(first, at(4, 0)) and not torch.equal(first, at(3, 1))


@pytest.mark.parametrize("method", ["rlw", "pcgrad", "graddrop"])
def test_a_resumed_engine_draws_what_the_first_would_have(method):
    theta = nn.Parameter(torch.zeros(G.shape[1]))
    first = Engine(method, [theta], seed=11)
    for _ in range(3):
        first.backward(linear_losses(theta))
    state = first.state_dict()
    theta.grad = None
    expected = first.backward(linear_losses(theta))
    expected_grad = theta.grad.clone()
    resumed = Engine(method, [theta], seed=11)
    resumed.load_state_dict(state)
    assert resumed.index == 3
    theta.grad = None
    got = resumed.backward(linear_losses(theta))
    assert got.index == expected.index == 3 and got.weights == expected.weights
    torch.testing.assert_close(theta.grad, expected_grad, rtol=0, atol=0)
