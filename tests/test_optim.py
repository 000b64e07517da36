"""The Trainer's optimiser: torch's fused kernel where it has one for the parameters, else its default."""

from __future__ import annotations

import pytest
import torch

import polytask as pt
from polytask.core.errors import InvalidParameterError
from polytask.train.optim import build_optimizer, fusable

TASKS = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]


def _data(n: int = 96) -> pt.data.MultiOutputDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 5, generator=g)
    return pt.data.MultiOutputDataset(x, {"a": x[:, 0], "b": (x[:, 1] > 0).float()})


def _trainer(**optim) -> pt.Trainer:
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=5, hidden=[8]), TASKS)
    return pt.Trainer(model, TASKS, loop={"epochs": 2, "batch_size": 32}, optim=optim, run={"progress": False}, seed=0)


@pytest.mark.parametrize(("name", "momentum"), [("adam", 0.9), ("adamw", 0.9), ("sgd", 0.0)])
def test_fused_where_torch_has_it_unless_told(name, momentum):
    params = [torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2))]
    assert build_optimizer(name, [{"params": params}], lr=0.1, momentum=momentum).defaults["fused"] is True
    assert not build_optimizer(name, [{"params": params}], lr=0.1, momentum=momentum, fused=False).defaults["fused"]


def test_sgd_with_momentum_is_not_fused_and_takes_a_head_whose_labels_come_late():
    """torch's fused SGD with momentum raises a TypeError on the step where a parameter gets its first
    gradient after a step without one (a task whose first labelled batch is not the first)."""
    trunk, head = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = build_optimizer("sgd", [{"params": [trunk, head]}], lr=0.1, momentum=0.9)
    assert not optimizer.defaults["fused"]
    trunk.grad = torch.ones(2)
    optimizer.step()  # the head's task had no label in this batch
    trunk.grad, head.grad = torch.ones(2), torch.ones(2)
    optimizer.step()
    assert head.tolist() == pytest.approx([0.9, 0.9])


def test_fusable_needs_floating_tensors_on_one_kind_of_device():
    assert fusable([torch.zeros(2), torch.zeros(3, dtype=torch.float64)])
    assert not fusable([])
    assert not fusable([torch.zeros(2), torch.zeros(2, device="meta")])  # two kinds of device
    assert not fusable([torch.zeros(2, dtype=torch.long)])


def test_trainer_steps_with_the_fused_optimiser_and_can_be_told_not_to():
    fused, loop = _trainer(), _trainer(fused=False)
    assert fused.optimizer.defaults["fused"] is True and not loop.optimizer.defaults["fused"]
    fused.fit(_data())
    loop.fit(_data())
    for p, q in zip(fused.model.parameters(), loop.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # the same steps, rounded differently


def test_fused_must_be_a_bool_or_null():
    with pytest.raises(InvalidParameterError, match="fused"):
        _trainer(fused="sometimes")


def test_the_trainer_clears_every_optimised_gradient_and_calls_an_optimisers_own_zero_grad():
    trainer = _trainer()
    params = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    trainer._zero_grads()
    assert params and all(p.grad is None for p in params)

    calls = []

    class Counting(torch.optim.SGD):
        def zero_grad(self, set_to_none: bool = True) -> None:
            calls.append(set_to_none)
            super().zero_grad(set_to_none=set_to_none)

    trainer.optimizer = Counting(params, lr=0.1)
    trainer._zero_grads()
    assert calls == [True]
