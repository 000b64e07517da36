"""The plain-loop API keeps state: an Engine driven by hand gives, step for step, the weights the
Trainer's engine gives on the same losses (and the same task Gramians)."""

from __future__ import annotations

import pytest
import torch

import polytask as pt
from polytask.data import MultiOutputDataset

TASKS = [pt.Task("a", kind="regression"), pt.Task("b", kind="regression"), pt.Task("c", kind="binary")]


class Record(pt.train.Callback):
    """Keeps every step's report."""

    def __init__(self) -> None:
        self.reports = []

    def on_step_end(self, trainer, step):
        self.reports.append(step.report)


def data(n: int = 192, seed: int = 0) -> MultiOutputDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return MultiOutputDataset(x, {"a": x[:, 0] - x[:, 1], "b": 3 * x[:, 2] + torch.randn(n, generator=g),
                                  "c": (x[:, 3] > 0).float()})


def replay(engine: pt.Engine, report) -> dict[str, float]:
    """Feed the engine losses with the recorded values and, when recorded, the recorded Gramian:
    Lᵢ(θ′) = vᵢ + aᵢᵀθ′ at θ′ = 0 has value vᵢ and gradients A with A Aᵀ = G."""
    (theta,) = engine.shared
    values = report.losses.double()
    if report.gramian is not None:
        vals, vecs = torch.linalg.eigh(report.gramian.double())
        factor = vecs * vals.clamp_min(0).sqrt()
    else:
        factor = torch.zeros(len(values), theta.numel(), dtype=torch.float64)
    losses = {t: values[i] + factor[i] @ theta for i, t in enumerate(report.tasks)}
    theta.grad = None
    return engine.backward(losses).weights


@pytest.mark.parametrize("method", ["rlw", "famo", "pcgrad", "nash_mtl", "gradnorm", "uncertainty"])
def test_engine_driven_by_hand_gives_the_trainers_weights(method):
    record = Record()
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16]), TASKS)
    trainer = pt.Trainer(model, TASKS, method=method, loop={"epochs": 2, "batch_size": 32}, run={"progress": False},
                         seed=7, callbacks=[record])
    trainer.fit(data())
    assert len(record.reports) == 12

    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)  # rank ≤ T: the Gramian factor fits in ℝ³
    engine = pt.Engine(method, [theta], last_shared_params=[theta], seed=7)  # the Trainer's seed
    engine.method.setup([t.name for t in TASKS])  # learnable methods: create the parameters for the optimizer
    learned = list(engine.parameters())
    optimizer = torch.optim.Adam(learned, lr=1e-3) if learned else None  # the Trainer's default optimiser
    for report in record.reports:
        if optimizer is not None:
            optimizer.zero_grad()
        got = replay(engine, report)
        if optimizer is not None:
            optimizer.step()
        expected = report.weights
        assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), f"{method} at step {report.index}"
    assert engine.index == trainer.engine.index == 12


def test_random_weights_differ_over_calls_and_repeat_under_the_same_seed():
    theta = torch.zeros(2, requires_grad=True)

    def run(seed: int) -> list[dict[str, float]]:
        engine = pt.Engine("rlw", [theta], seed=seed)
        return [engine.backward({"a": theta.sum() + 1.0, "b": 2 * theta.sum() + 1.0}).weights for _ in range(4)]

    first = run(0)
    assert len({tuple(w.values()) for w in first}) == 4  # a fresh draw every step
    assert run(0) == first
    assert run(1) != first


def test_one_shot_backward_refuses_stateful_methods_with_the_replacement():
    theta = torch.zeros(2, requires_grad=True)
    with pytest.raises(pt.InvalidParameterError, match=r"engine = polytask.Engine\('rlw'") as info:
        pt.backward({"a": theta.sum(), "b": theta.sum()}, [theta], "rlw")
    assert "engine.backward(losses)" in str(info.value)
    report = pt.backward({"a": theta.sum(), "b": 2 * theta.sum()}, [theta], "mgda")  # stateless: fine
    assert set(report.weights) == {"a", "b"}
