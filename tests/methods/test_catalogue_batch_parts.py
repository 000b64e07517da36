"""Methods that ask for independent parts of each batch (``Method.batch_parts``): MoDo end to end.

The engine takes each task's part losses stacked, computes one Jacobian per part and hands the
method their cross Gramians; the Trainer splits every batch for such a method. MoDo's λ is checked
against TorchJD's ``MoDoWeighting`` fed J₁J₂ᵀ of the same two halves.
"""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tja

import polytask as pt
from polytask.core.errors import InvalidParameterError
from polytask.data import MultiOutputDataset
from polytask.engine import Engine
from polytask.methods import METHODS

from .helpers import Tiny, flat_grad

pytestmark = pytest.mark.usefixtures("one_thread")


def _half_losses(model: Tiny, seed: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=gen), torch.randn(len(model.tasks), 16, generator=gen)
    halves = []
    for rows in (slice(0, None, 2), slice(1, None, 2)):
        z = model.encoder(x[rows])
        halves.append({t: ((model.heads[t](z).squeeze(-1) - (i + 1) * y[i, rows]) ** 2).mean()
                       for i, t in enumerate(model.tasks)})
    return {t: torch.stack([h[t] for h in halves]) for t in model.tasks}, halves


def test_modo_engine_matches_torchjd_on_two_half_batches():
    model = Tiny(("t0", "t1", "t2"), seed=1)
    shared = model.shared()
    engine = Engine(METHODS.create("modo", gamma=0.5, rho=0.1), shared)
    peer = tja.MoDoWeighting(gamma=0.5, rho=0.1)
    for k in range(3):
        stacked, halves = _half_losses(model, seed=k)
        j1, j2 = (torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(h[t], shared, retain_graph=True)])
                               for t in model.tasks]) for h in halves)
        lam = peer(j1 @ j2.T)
        heads = {t: sum(torch.autograd.grad(h[t], model.heads[t].weight, retain_graph=True)[0] for h in halves) / 2
                 for t in model.tasks}
        model.zero_grad()
        report = engine.backward(stacked)
        weights = torch.tensor([report.weights[t] for t in model.tasks])
        torch.testing.assert_close(weights, lam, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(flat_grad(shared), lam @ ((j1 + j2) / 2), rtol=1e-5, atol=1e-7)  # J of the mean loss
        for t in model.tasks:  # the heads (unweighted) get the whole batch's ∇Lᵢ
            torch.testing.assert_close(model.heads[t].weight.grad, heads[t], rtol=1e-5, atol=1e-7)


def test_sdmgrad_engine_matches_torchjd_on_two_half_batches():
    model = Tiny(("t0", "t1", "t2"), seed=3)
    shared = model.shared()
    engine = Engine(METHODS.create("sdmgrad", lamda=0.3), shared)
    peer = tja.SDMGradWeighting(lambda_=0.3)
    for k in range(3):
        stacked, halves = _half_losses(model, seed=10 + k)
        j1, j2 = (torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(h[t], shared, retain_graph=True)])
                               for t in model.tasks]) for h in halves)
        expected = peer((j1 @ j2.T).double())
        model.zero_grad()
        report = engine.backward(stacked)
        weights = torch.tensor([report.weights[t] for t in model.tasks], dtype=torch.float64)
        torch.testing.assert_close(weights, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(flat_grad(shared), weights.float() @ ((j1 + j2) / 2), rtol=1e-5, atol=1e-6)


def test_scalar_losses_are_refused_with_the_shape_expected():
    model = Tiny(("t0", "t1"))
    engine = Engine("modo", model.shared())
    _, losses = model.losses()
    with pytest.raises(InvalidParameterError, match=r"'modo' needs each task's loss on 2 independent parts .* shape \(2,\)"):
        engine.backward(losses)
    with pytest.raises(InvalidParameterError, match="use compare='shared' or 'last_shared' and every=1"):
        Engine("modo", model.shared(), compare="features")
    single = Engine(METHODS.create("modo", parts=1), model.shared())  # the single-batch estimate takes scalars
    assert sum(single.backward(losses).weights.values()) == pytest.approx(1.0)


def test_modo_trains_from_the_trainer_on_batch_halves():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=gen)
    data = MultiOutputDataset(x, {"a": x @ torch.linspace(-1, 1, 6), "b": (x[:, 0] > 0).float()})
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16]), tasks)
    trainer = pt.Trainer(model, tasks, method={"name": "modo", "gamma": 0.01}, loop={"epochs": 3, "batch_size": 32},
                         optim={"lr": 1e-2}, run={"progress": False})
    assert trainer.engine.batch_parts == 2
    report = trainer.fit(data, data)
    lam = trainer.engine.method.lam
    assert bool((lam >= 0).all()) and float(lam.sum()) == pytest.approx(1.0)
    first, last = ([r["value"] for r in report.history if r["task"] == "a" and r["split"] == "val" and r["metric"] == "loss"][i]
                   for i in (0, -1))
    assert last < 0.7 * first


def test_per_task_clipping_scales_the_part_gramians_too():
    model = Tiny(("t0", "t1"), seed=5)
    stacked, _ = _half_losses(model, seed=3)
    seen = {}

    class Spy(type(METHODS.create("modo"))):
        def weights(self, step):
            seen["g"], seen["parts"] = step.gramian, step.part_gramians
            return super().weights(step)

    engine = Engine(Spy(), model.shared(), task_clip=1e-3)
    report = engine.backward(stacked)
    c = report.clip.double()
    g = seen["parts"].double().sum(dim=(0, 1)) / 4  # G of the mean from the clipped parts
    torch.testing.assert_close(g, seen["g"].double(), rtol=1e-5, atol=1e-12)
    assert bool((c < 1).all()) and float(seen["g"].diagonal().max()) <= 1e-6 * (1 + 1e-4)
