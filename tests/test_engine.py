import pytest
import torch

import polytask as pt
from polytask.engine import Engine, gramian, task_jacobian
from polytask.methods import METHODS, Method, Step


def small_model(n_tasks=3):
    tasks = [pt.Task(f"t{i}", kind="regression") for i in range(n_tasks)]
    return pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[6, 5]), tasks), tasks


def losses_of(model, tasks, x, y):
    z = model.encode(x)
    out = model.decode(z)
    return z, {t.name: t.loss(out[t.name], y[:, i]) for i, t in enumerate(tasks)}


def grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


def test_static_total_is_weighted_sum():
    model, tasks = small_model()
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    lambdas = {"t0": 2.0, "t1": 0.5, "t2": 0.0}
    method = METHODS.create("static", weights=lambdas)
    method.setup([t.name for t in tasks])
    _, losses = losses_of(model, tasks, x, y)
    weights = pt.backward(losses, model.shared_parameters(), method)
    assert weights == lambdas
    got = grads(model)
    model.zero_grad()
    _, losses = losses_of(model, tasks, x, y)
    sum(lambdas[k] * v for k, v in losses.items()).backward()
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b)


class _Half(Method):
    """Test method: needs the Gramian, returns 1/2 per task."""

    needs = "gramian"

    def weights(self, step: Step):
        assert step.gramian is not None and step.gramian.shape == (len(step.tasks),) * 2
        return torch.full_like(step.losses, 0.5)


def test_gramian_path_reuses_jacobian_and_matches_full_backward():
    model, tasks = small_model()
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    _, losses = losses_of(model, tasks, x, y)
    Engine(_Half(), list(model.shared_parameters())).backward(losses)
    got = grads(model)
    model.zero_grad()
    _, losses = losses_of(model, tasks, x, y)
    (0.5 * sum(losses.values())).backward()
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b)


def test_features_mode_gramian_matches_hand_computation():
    model, tasks = small_model()
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    seen = {}

    class Spy(_Half):
        def weights(self, step):
            seen["g"] = step.gramian
            return super().weights(step)

    z, losses = losses_of(model, tasks, x, y)
    Engine(Spy(), list(model.shared_parameters()), mode="features").backward(losses, features=[z])
    z2, losses2 = losses_of(model, tasks, x, y)
    rows = [torch.autograd.grad(v, z2, retain_graph=True)[0].reshape(-1) for v in losses2.values()]
    j = torch.stack(rows)
    torch.testing.assert_close(seen["g"], j @ j.T)


def test_missing_task_gets_zero_weight_and_no_gradient():
    model, tasks = small_model(2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    _, losses = losses_of(model, tasks, x, y)
    losses["t1"] = None
    weights = pt.backward(losses, model.shared_parameters(), "equal")
    assert weights == {"t0": 1.0, "t1": 0.0}
    assert all(p.grad is None for p in model.heads["t1"].parameters())


def test_recompute_every_k_reuses_weights():
    calls = []

    class Counting(_Half):
        def weights(self, step):
            calls.append(step.index)
            return super().weights(step)

    model, tasks = small_model()
    engine = Engine(Counting(), list(model.shared_parameters()), every=3)
    for i in range(7):
        _, losses = losses_of(model, tasks, torch.randn(4, 4), torch.randn(4, 3))
        engine.backward(losses, index=i)
    assert calls == [0, 3, 6]


def test_jacobian_and_gramian_helpers():
    p = torch.randn(3, requires_grad=True)
    losses = [(p * torch.tensor([1.0, 0, 0])).sum(), (p ** 2).sum()]
    j = task_jacobian(losses, [p])
    torch.testing.assert_close(j, torch.stack([torch.tensor([1.0, 0, 0]), 2 * p.detach()]))
    torch.testing.assert_close(gramian(j), j @ j.T)


def test_bad_weights_shape_is_reported():
    class Wrong(Method):
        def weights(self, step):
            return torch.ones(5)

    model, tasks = small_model(2)
    _, losses = losses_of(model, tasks, torch.randn(4, 4), torch.randn(4, 2))
    with pytest.raises(pt.InvalidParameterError, match=r"shape \(5,\); expected \(2,\)"):
        pt.backward(losses, model.shared_parameters(), Wrong())


def test_batched_jacobian_matches_loop_and_auto_picks_one():
    from polytask.engine.jacobian import JacobianComputer, batched_task_jacobian

    model, tasks = small_model(5)
    _, losses = losses_of(model, tasks, torch.randn(8, 4), torch.randn(8, 5))
    vec = torch.stack(list(losses.values()))
    shared = list(model.shared_parameters())
    loop = task_jacobian(list(vec), shared)
    for chunk in (None, 2):
        torch.testing.assert_close(batched_task_jacobian(vec, shared, chunk), loop)
    auto = JacobianComputer("auto", trials=1)
    for _ in range(3):
        torch.testing.assert_close(auto(vec, shared), loop)
    assert auto.chosen in ("loop", "batched")


def test_loss_scale_does_not_change_weights_and_overflow_skips_method():
    model, tasks = small_model(2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    _, losses = losses_of(model, tasks, x, y)
    w1 = Engine("mgda", list(model.shared_parameters())).backward(losses)
    g1 = grads(model)
    model.zero_grad()
    _, losses = losses_of(model, tasks, x, y)
    w2 = Engine("mgda", list(model.shared_parameters())).backward(losses, scale=1024.0)
    assert w1 == pytest.approx(w2)
    for a, b in zip(g1, grads(model)):
        torch.testing.assert_close(a * 1024.0, b)
    model.zero_grad()
    _, losses = losses_of(model, tasks, x, y)
    weights = Engine("mgda", list(model.shared_parameters())).backward(losses, scale=float("inf"))
    assert weights == {"t0": 1.0, "t1": 1.0}
    assert not all(torch.isfinite(p.grad).all() for p in model.shared_parameters())


def test_bf16_autocast_with_gradient_method():
    model, tasks = small_model(3)
    x, y = torch.randn(8, 4), torch.randn(8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, losses = losses_of(model, tasks, x, y)
    weights = pt.backward(losses, model.shared_parameters(), "upgrad")
    assert all(v > 0 for v in weights.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_per_task_clipping_bounds_each_task_norm():
    model, tasks = small_model(3)
    x, y = torch.randn(8, 4), 10 * torch.randn(8, 3)
    shared = list(model.shared_parameters())
    _, losses = losses_of(model, tasks, x, y)
    j = task_jacobian(list(losses.values()), shared)
    norms = j.norm(dim=1)
    limit = float(norms.min()) / 2  # every task is clipped
    engine = Engine("equal", shared, task_clip=limit)
    weights = engine.backward(losses)
    factors = (limit / norms).clamp(max=1.0)
    assert list(weights.values()) == pytest.approx(factors.tolist(), rel=1e-5)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, factors @ j, rtol=1e-5, atol=1e-6)
    for row in factors[:, None] * j:
        assert float(row.norm()) <= limit * (1 + 1e-5)
    torch.testing.assert_close(engine.last_gramian, j @ j.T, rtol=1e-5, atol=1e-5)


def test_diagnose_exposes_gramian_without_changing_the_update():
    model, tasks = small_model(2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    _, losses = losses_of(model, tasks, x, y)
    engine = Engine("equal", list(model.shared_parameters()))
    engine.backward(losses, diagnose=True)
    assert engine.last_gramian is not None and engine.last_gramian.shape == (2, 2)
    got = grads(model)
    model.zero_grad()
    _, losses = losses_of(model, tasks, x, y)
    sum(losses.values()).backward()
    for a, b in zip(got, grads(model)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", [n for n in METHODS.names() if n != "warmup"])
def test_every_method_trains_under_bf16_autocast(name):
    model, tasks = small_model(3)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    method = METHODS.create(name)
    method.setup([t.name for t in tasks], sizes={t.name: 100 for t in tasks})
    engine = Engine(method, list(model.shared_parameters()))
    for i in range(2):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, losses = losses_of(model, tasks, x, y)
        weights = engine.backward(losses, features=[z], index=i)
        assert all(torch.isfinite(torch.tensor(v)) for v in weights.values()), name
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shared_parameters()), name
