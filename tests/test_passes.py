"""The engine's backward passes (polytask.engine.passes) against torch's public calls."""

from __future__ import annotations

import pytest
import torch

from polytask.engine import passes
from polytask.engine.passes import accumulate, loss_grads


def _graph(seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3))
    unused = torch.nn.Parameter(torch.randn(2))
    out = model(torch.randn(4, 5))
    return model, out, [*model.parameters(), unused]


def test_loss_grads_equal_torch_grad_and_leave_none_where_unreached() -> None:
    model, out, inputs = _graph()
    loss = out[:, 0].pow(2).mean()
    ours = loss_grads(loss, tuple(inputs), retain_graph=True)
    theirs = torch.autograd.grad(loss, inputs, allow_unused=True)
    assert ours[-1] is None and theirs[-1] is None
    for a, b in zip(ours[:-1], theirs[:-1], strict=True):
        assert torch.equal(a, b)
    assert all(p.grad is None for p in inputs)  # nothing accumulated


def test_loss_grads_frees_the_graph_unless_retained() -> None:
    _, out, inputs = _graph()
    loss = out.sum()
    loss_grads(loss, tuple(inputs[:-1]), retain_graph=False)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        loss_grads(loss, tuple(inputs[:-1]), retain_graph=False)


def test_accumulate_equals_backward_with_and_without_inputs() -> None:
    model, out, inputs = _graph()
    twin, twin_out, twin_inputs = _graph()
    accumulate(out.sum())
    twin_out.sum().backward()
    for a, b in zip(inputs[:-1], twin_inputs[:-1], strict=True):
        assert torch.equal(a.grad, b.grad)
    _, out, inputs = _graph(1)
    first = inputs[0]
    accumulate(out.sum(), (first,))
    assert first.grad is not None and all(p.grad is None for p in inputs[1:])


@pytest.mark.parametrize("make", ["vector", "integer", "no_grad"])
def test_anything_but_a_float_scalar_gets_torchs_own_error(make: str) -> None:
    _, out, inputs = _graph()
    loss = {"vector": out.sum(dim=0), "integer": torch.ones((), dtype=torch.long),
            "no_grad": out.sum().detach()}[make]
    with pytest.raises(RuntimeError) as ours:
        loss_grads(loss, tuple(inputs[:-1]), retain_graph=True)
    with pytest.raises(RuntimeError) as theirs:
        torch.autograd.grad(loss, inputs[:-1], retain_graph=True, allow_unused=True)
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(RuntimeError) as ours_backward:
        accumulate(loss, retain_graph=True)
    with pytest.raises(RuntimeError) as theirs_backward:
        torch.autograd.backward(loss, retain_graph=True)
    assert str(ours_backward.value) == str(theirs_backward.value)


class _Logged(torch.Tensor):
    """A tensor subclass with a ``__torch_function__``: torch's public call must see it."""

    seen: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        cls.seen.append(getattr(func, "__name__", str(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


def test_a_tensor_subclass_takes_torchs_public_call() -> None:
    leaf = torch.randn(3).requires_grad_(True)
    loss = (leaf * 2).sum().as_subclass(_Logged)
    _Logged.seen.clear()
    (grad,) = loss_grads(loss, (leaf,), retain_graph=False)
    assert "grad" in _Logged.seen  # dispatched through torch.autograd.grad's override handling
    assert torch.equal(grad, torch.full((3,), 2.0))


def test_without_the_private_entry_point_every_pass_is_torchs_public_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(passes, "_run_backward", None)
    _, out, inputs = _graph()
    (ours,) = loss_grads(out.sum(), (inputs[0],), retain_graph=True)
    (theirs,) = torch.autograd.grad(out.sum(), inputs[0], retain_graph=True)
    assert torch.equal(ours, theirs)
    accumulate(out.sum(), (inputs[0],))
    assert torch.equal(inputs[0].grad, theirs)
