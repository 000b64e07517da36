"""Learning to Branch: the warm-up mix, the Gumbel search (straight-through to α), the fixed argmax tree."""

from __future__ import annotations

import pytest
import torch

import polytask as pt
from polytask.core.errors import InvalidParameterError
from polytask.models import LTB


def _model(n_tasks: int = 3, **options) -> LTB:
    torch.manual_seed(0)
    tasks = [pt.Task(f"t{i}", kind="regression") for i in range(n_tasks)]
    return LTB(lambda: pt.encoders.MLP(in_features=4, hidden=[6, 5, 3]), tasks, **options)


def _chain(model: LTB, x: torch.Tensor, parents: list[list[int]], column: int) -> torch.Tensor:
    """Column ``column``'s output on the tree ``parents`` (parents[l][i]: stage l + 1's parent of column i)."""
    path = [column]
    for level in range(len(parents), 0, -1):
        path.append(parents[level - 1][path[-1]])
    path.reverse()  # the column whose stage l is used, for l = 0 … L
    out = x
    for level, c in enumerate(path):
        out = model._stages[c][level](out)
    return out


def test_warmup_averages_search_samples_one_parent_and_trains_alpha():
    model = _model(warmup_steps=1, search_steps=5)
    x = torch.randn(7, 4)
    model.train()
    assert model.phase() == "warmup"
    z = model.encode(x)
    stage0 = [s[0](x) for s in model._stages]
    mean = torch.stack(stage0).mean(0)
    stage1 = [s[1](mean) for s in model._stages]
    torch.testing.assert_close(z[:, 2], model._stages[2][2](torch.stack(stage1).mean(0)))
    assert model.phase() == "search"
    z = model.encode(x)
    z.sum().backward()
    assert model.alphas.grad is not None and bool(model.alphas.grad.abs().sum() > 0)  # straight-through
    assert int(model.steps) == 2


def test_fixed_tree_is_argmax_and_computes_only_used_columns():
    model = _model(search_steps=0)
    with torch.no_grad():
        model.alphas.zero_()
        model.alphas[:, :, 0] = 1.0  # every column reads column 0: a shared trunk …
        model.alphas[1, 2] = torch.tensor([0.0, 0.0, 1.0])  # … except the last stage of column 2, which reads itself
    parents = model.branches()
    assert parents == [[0, 0, 0], [0, 0, 2]]
    calls = {i: 0 for i in range(3)}
    hooks = [model._stages[i][0].register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i in range(3)]
    x = torch.randn(5, 4)
    model.train()
    z = model.encode(x)
    for h in hooks:
        h.remove()
    assert calls == {0: 1, 1: 0, 2: 0}  # only the trunk's first stage runs
    for i in range(3):
        torch.testing.assert_close(z[:, i], _chain(model, x, parents, i))
    model.eval()
    torch.testing.assert_close(model.encode(x), z)


def test_the_step_count_resumes_and_bad_options_are_refused():
    model = _model(warmup_steps=2, search_steps=4)
    model.train()
    for _ in range(3):
        model.encode(torch.randn(2, 4))
    fresh = _model(warmup_steps=2, search_steps=4)
    fresh.load_state_dict(model.state_dict())
    fresh.train()
    assert fresh.phase() == "search" and int(fresh.steps) == 3
    with pytest.raises(InvalidParameterError, match="`search_steps` of `ltb` .* must be >= `warmup_steps`"):
        _model(warmup_steps=5, search_steps=2)
    with pytest.raises(InvalidParameterError, match="`tau` of `ltb` must be > 0"):
        _model(tau=0)


def test_trains_with_a_gradient_method():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 4, generator=gen)
    data = pt.data.MultiOutputDataset(x, {"t0": x[:, 0], "t1": x[:, 0] + x[:, 1], "t2": -x[:, 2]})
    model = _model(warmup_steps=4, search_steps=20, decay_steps=5)
    trainer = pt.Trainer(model, [model.tasks[t] for t in model.task_names], method="mgda",
                         loop={"epochs": 5, "batch_size": 16}, optim={"lr": 1e-2}, run={"progress": False})
    report = trainer.fit(data, data)
    assert model.phase() == "fixed" and int(model.steps) == 40
    losses = [r["value"] for r in report.history if r["task"] == "t1" and r["split"] == "val" and r["metric"] == "loss"]
    assert losses[-1] < losses[0]
