"""The engine: what lands in ``.grad`` (the weighted sum, a method's direction, J reused for θ), the
feature Gramian, missing tasks, recomputing every k steps, loss scales and overflow, per-task
clipping, diagnostics, bf16, learnable method parameters, the step report, its state, setting a
method up from the first losses and the options it no longer takes."""

from __future__ import annotations

import copy
import importlib
import math

import pytest
import torch
from torch import nn

import polytask as pt
from polytask.engine import Engine, gramian, task_jacobian
from polytask.methods import METHODS, Method, Step

from .helpers import GRADIENT, NAMES, Tiny, build, flat, flat_grad, grads, hard_sharing, model_losses

#: the engine's module (``polytask.engine.backward`` is also the name of a function the package exports)
engine_module = importlib.import_module("polytask.engine.backward")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny tensors: one intra-op thread is faster on a shared machine."""


def data(n_tasks: int = 3, batch: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, generator=gen), torch.randn(batch, n_tasks, generator=gen)


class Half(Method):
    """Test method: needs the Gramian, returns 1/2 per task."""

    needs = "gramian"

    def weights(self, step: Step):
        assert step.gramian is not None and step.gramian.shape == (len(step.tasks),) * 2
        return torch.full_like(step.losses, 0.5)


# --- what lands in .grad ---------------------------------------------------------------------------


def test_static_total_is_weighted_sum():
    model, tasks = hard_sharing()
    lambdas = {"t0": 2.0, "t1": 0.5, "t2": 0.0}
    _, losses = model_losses(model, tasks, *data())
    report = pt.backward(losses, model.shared_parameters(), METHODS.create("static", weights=lambdas))
    assert report.weights == lambdas and report.compare == "none" and report.heads == "weighted"
    got = grads(model.parameters())
    model.zero_grad()
    _, losses = model_losses(model, tasks, *data())
    sum(lambdas[k] * v for k, v in losses.items()).backward()
    for a, b in zip(got, grads(model.parameters()), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("route", ["loop", "batched", "batched, heads larger than θ"])
def test_gramian_path_computes_j_once_and_matches_full_backward(monkeypatch, route):
    """θ gets Jᵀw from the J computed for the Gramian (no second backward through θ). The heads'
    gradients come from the same T passes (the CPU default), or from the same vmapped passes with
    ``jacobian: batched``, and no backward follows the method at all; only when the heads hold
    more values than θ (T-fold gradients larger than J) does a backward into the heads follow."""
    model, tasks = hard_sharing()
    if route.startswith("batched, heads"):  # θ: 4·1 + 1 values; heads: 3 × (1 + 1)
        model = pt.models.HardSharing(encoder=pt.encoders.MLP(in_features=4, hidden=[1]), tasks=tasks)
    _, losses = model_losses(model, tasks, *data())
    engine = Engine(Half(), model.shared_parameters(), heads="weighted", jacobian="auto" if route == "loop" else "batched")
    calls, backwards = [], []
    computer, fused_jacobian = engine.jacobian, engine._fused_jacobian
    engine._fused_jacobian = lambda *args, **kwargs: calls.append("fused") or fused_jacobian(*args, **kwargs)
    real_backward, real_grad = torch.autograd.backward, torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "backward", lambda *a, **k: backwards.append(1) or real_backward(*a, **k))
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(
        "vmapped" if k.get("is_grads_batched") else "pass") or real_grad(*a, **k))
    # the engine's own entry points into autograd (polytask.engine.passes), which skip torch's public calls
    real_loss_grads, real_accumulate = engine_module.loss_grads, engine_module.accumulate
    monkeypatch.setattr(engine_module, "loss_grads", lambda *a, **k: calls.append("pass") or real_loss_grads(*a, **k))
    monkeypatch.setattr(engine_module, "accumulate", lambda *a, **k: backwards.append(1) or real_accumulate(*a, **k))
    report = engine.backward(losses)
    assert calls == {"loop": ["fused", "pass", "pass", "pass"], "batched": ["fused", "vmapped"],
                     "batched, heads larger than θ": ["fused", "vmapped"]}[route]
    assert len(backwards) == (1 if route.startswith("batched, heads") else 0)
    assert computer.loops(losses["t0"]) == (route == "loop")
    assert report.weights == {"t0": 0.5, "t1": 0.5, "t2": 0.5}
    assert report.gramian is not None and report.gramian.shape == (3, 3) and report.compare == "shared"
    got = grads(model.parameters())
    model.zero_grad()
    _, losses = model_losses(model, tasks, *data())
    (0.5 * sum(losses.values())).backward()
    for a, b in zip(got, grads(model.parameters()), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("jacobian", ["loop", "batched"])
@pytest.mark.parametrize("heads", ["weighted", "unweighted"])
def test_declared_params_skip_the_graph_walk_and_change_no_bit(monkeypatch, jacobian, heads):
    """``params=``: after the first step's walk, the fused passes ask for the declared leaves outside θ
    without walking the graph; every step's gradients equal those of an engine that walks, bit for
    bit (a parameter listed twice gets its gradient once)."""
    walks = []
    real_leaves = Engine._leaves
    monkeypatch.setattr(Engine, "_leaves", staticmethod(lambda *a, **k: walks.append(1) or real_leaves(*a, **k)))
    models = [hard_sharing(seed=1)[0] for _ in range(2)]
    tasks = hard_sharing()[1]
    engines = [Engine("pcgrad", m.shared_parameters(), jacobian=jacobian, heads=heads,
                      **({"params": [*m.parameters(), *m.parameters()]} if k else {})) for k, m in enumerate(models)]
    for step in range(4):
        got = []
        for k, (model, engine) in enumerate(zip(models, engines, strict=True)):
            model.zero_grad(set_to_none=True)
            walks.clear()
            engine.backward(model_losses(model, tasks, *data(seed=step))[1])
            got.append(grads(model.parameters()))
            if k == 1:
                assert len(walks) == (1 if step == 0 else 0)
        for a, b in zip(*got, strict=True):
            assert torch.equal(a, b)


def test_a_leaf_outside_the_declared_params_keeps_the_walk():
    """A tensor the losses reach that is not among ``params`` (here a learnable input scale) is found
    by the walk on every step and gets its gradient, as without ``params``."""
    model, tasks = hard_sharing()
    scale = torch.ones(4, requires_grad=True)
    engine = Engine("mgda", model.shared_parameters(), params=model.parameters())
    for step in range(3):
        scale.grad = None
        x, y = data(seed=step)
        engine.backward(model_losses(model, tasks, x * scale, y)[1])
        assert scale.grad is not None and torch.isfinite(scale.grad).all()
    assert engine._private_leaves is None  # still walking


@pytest.mark.parametrize("name", ["mgda", "upgrad", "pcgrad"])
@pytest.mark.parametrize("heads", ["weighted", "unweighted"])
def test_batched_fused_passes_equal_the_loop(name, heads):
    """``jacobian: batched``: one vmapped backward gives J and every head's gradient; the update
    (θ, heads) equals the per-task loop's to round-off, over steps with a loss scale too."""
    out = {}
    for jacobian in ("loop", "batched"):
        model, tasks = hard_sharing(n_tasks=4)
        engine = Engine(build(name), model.shared_parameters(), heads=heads, jacobian=jacobian, gramian="jacobian")
        for i, scale in enumerate((1.0, 1.0, 64.0)):
            model.zero_grad(set_to_none=True)
            _, losses = model_losses(model, tasks, *data(n_tasks=4, seed=i))
            report = engine.backward(losses, scale=scale)
        out[jacobian] = (grads(model.parameters()), report.weights)
    for a, b in zip(out["loop"][0], out["batched"][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert out["loop"][1] == pytest.approx(out["batched"][1], rel=1e-5)


@pytest.mark.parametrize("name", GRADIENT)
def test_engine_applies_the_method(name):
    """With weighted heads every parameter receives Σ wᵢ ∇Lᵢ, except that the compared parameters
    receive the method's direction when it gives one; the weights are those of the method on a
    Step built by hand from the compared gradients (same index and seed, so the same draws)."""
    model = Tiny()
    method = build(name, model.tasks)
    engine = Engine(method, model.shared(), last_shared_params=model.last_shared(), heads="weighted")
    compare = engine.compare
    params = list(model.parameters())
    z, losses = model.losses()
    full = task_jacobian(list(losses.values()), params)
    theta = {"shared": model.shared(), "last_shared": model.last_shared(), "features": []}[compare]
    in_theta = torch.cat([torch.full((p.numel(),), any(p is q for q in theta)) for p in params])
    jt = full[:, in_theta]
    g = task_jacobian(list(losses.values()), [z]) if compare == "features" else jt
    reference = build(name, model.tasks)
    step = Step(tasks=model.tasks, losses=torch.stack(list(losses.values())).detach(), index=0, seed=0,
                gramian=g @ g.T, jacobian=jt if reference.needs == "jacobian" else None,
                param_shapes=tuple(p.shape for p in theta) if reference.needs == "jacobian" else None)
    expected = reference(step)
    model.zero_grad()
    report = engine.backward(losses, features=[z])
    assert report.compare == compare == METHODS.get(name).compare
    w = torch.tensor([report.weights[t] for t in model.tasks])
    torch.testing.assert_close(w, expected.weights.float(), rtol=1e-4, atol=1e-5)
    want = w @ full
    if expected.direction is not None:
        want[in_theta] = expected.direction
    torch.testing.assert_close(flat_grad(params), want, rtol=1e-4, atol=1e-5)


def test_features_gramian_matches_hand_computation():
    model, tasks = hard_sharing()
    seen = {}

    class Spy(Half):
        def weights(self, step):
            seen["g"] = step.gramian
            return super().weights(step)

    z, losses = model_losses(model, tasks, *data())
    report = Engine(Spy(), model.shared_parameters(), compare="features").backward(losses, features=[z])
    z2, losses2 = model_losses(model, tasks, *data())
    j = torch.stack([torch.autograd.grad(v, z2, retain_graph=True)[0].reshape(-1) for v in losses2.values()])
    torch.testing.assert_close(seen["g"], j @ j.T)
    torch.testing.assert_close(report.feature_gramian, j @ j.T)
    assert report.compare == "features" and report.gramian is None  # J on θ was not computed


def test_features_compare_needs_the_representation():
    model, tasks = hard_sharing()
    _, losses = model_losses(model, tasks, *data())
    with pytest.raises(pt.InvalidParameterError, match=r"pass features=\[z\]"):
        Engine("mgda_ub", model.shared_parameters()).backward(losses)


def test_missing_task_gets_zero_weight_and_no_gradient():
    model, tasks = hard_sharing(2)
    _, losses = model_losses(model, tasks, *data(2))
    losses["t1"] = None
    report = pt.backward(losses, model.shared_parameters(), "equal")
    assert report.weights == {"t0": 1.0, "t1": 0.0} and report.tasks == ("t0",)
    assert all(p.grad is None for p in model.heads["t1"].parameters())
    model.zero_grad(set_to_none=True)
    report = Engine("mgda", model.shared_parameters()).backward({"t0": None, "t1": None})
    assert report.tasks == () and report.weights == {"t0": 0.0, "t1": 0.0}
    assert all(p.grad is None for p in model.parameters())


def test_recompute_every_k_reuses_weights():
    calls = []

    class Counting(Half):
        def weights(self, step):
            calls.append(step.index)
            return super().weights(step)

    model, tasks = hard_sharing()
    engine = Engine(Counting(), model.shared_parameters(), every=3)
    reports = []
    for i in range(7):
        _, losses = model_losses(model, tasks, *data(seed=i))
        reports.append(engine.backward(losses))
    assert calls == [0, 3, 6]
    assert [r.index for r in reports] == list(range(7)) and engine.index == 7
    assert [r.reused for r in reports] == [i % 3 != 0 for i in range(7)]
    assert all(r.weights == reports[0].weights for r in reports)


def test_reused_weights_are_applied_as_the_weighted_sum():
    """On a reuse step there is no J: θ gets Σ wᵢ ∇Lᵢ from one backward, the heads per ``heads``."""
    model, tasks = hard_sharing()
    engine = Engine("mgda", model.shared_parameters(), every=2, heads="unweighted")
    _, losses = model_losses(model, tasks, *data(seed=0))
    engine.backward(losses)
    model.zero_grad()
    _, losses = model_losses(model, tasks, *data(seed=1))
    report = engine.backward(losses)
    assert report.reused and report.gramian is None
    got_shared, got_heads = flat_grad(model.shared_parameters()), [flat_grad(model.task_parameters(t.name))
                                                                   for t in tasks]
    _, losses = model_losses(model, tasks, *data(seed=1))
    w = torch.tensor([report.weights[t.name] for t in tasks])
    shared = list(model.shared_parameters())
    torch.testing.assert_close(got_shared, w @ task_jacobian(list(losses.values()), shared), rtol=1e-5, atol=1e-6)
    for t, got in zip(tasks, got_heads, strict=True):
        own = list(model.task_parameters(t.name))
        torch.testing.assert_close(got, flat(torch.autograd.grad(losses[t.name], own, retain_graph=True)))


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

    model, tasks = hard_sharing(2)
    _, losses = model_losses(model, tasks, *data(2))
    with pytest.raises(pt.InvalidParameterError, match=r"shape \(5,\); expected \(2,\)"):
        pt.backward(losses, model.shared_parameters(), Wrong())


@pytest.mark.parametrize("name", ["equal", "famo", "uncertainty", "upgrad", "pcgrad"])
@pytest.mark.parametrize(("bad", "why"), [
    (lambda loss: loss.detach(), r"loss of task 't1' does not require grad .*pass None"),
    (lambda loss: loss.reshape(1), r"loss of task 't1' must be a scalar .*found shape \(1,\)"),
    (lambda loss: loss.detach().item(), r"loss of task 't1' must be a scalar tensor or None; found float"),
    (lambda loss: loss * (1 + 1j), r"loss of task 't1' must be a real floating-point scalar; found dtype "
                                   r"torch.complex64"),
], ids=["detached", "shape (1,)", "float", "complex"])
def test_a_bad_loss_is_one_clear_error_and_changes_nothing(name, bad, why):
    """A loss without a gradient (torch's error, or none: a loss-weighting method weighted it and
    trained nothing on it), not a scalar, or not a tensor: an error naming the task, before anything
    is written (the gradients, the step counter and the method's state are as they were)."""
    model, tasks = hard_sharing(2)
    engine = Engine(name, model.shared_parameters())
    _, losses = model_losses(model, tasks, *data(2))
    engine.backward(losses)
    before = ([p.grad.clone() for p in model.parameters()], engine.index, copy.deepcopy(engine.method.state_dict()))
    _, losses = model_losses(model, tasks, *data(2, seed=1))
    losses["t1"] = bad(losses["t1"])
    with pytest.raises(pt.InvalidParameterError, match=why):
        engine.backward(losses)
    after = ([p.grad for p in model.parameters()], engine.index, engine.method.state_dict())
    for a, b in zip(before[0], after[0], strict=True):
        assert torch.equal(a, b)
    assert before[1] == after[1]
    assert_same_state(after[2], before[2])


def assert_same_state(got, want) -> None:
    """Nested state (dicts, lists, tensors, plain values) equal bit for bit, NaN equal to NaN."""
    if isinstance(want, dict):
        assert got.keys() == want.keys()
        for key in want:
            assert_same_state(got[key], want[key])
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            assert_same_state(a, b)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    else:
        assert got == want or (got != got and want != want)


def test_batched_jacobian_matches_loop_and_auto_picks_one():
    from polytask.engine.jacobian import JacobianComputer, batched_task_jacobian

    model, tasks = hard_sharing(5)
    _, losses = model_losses(model, tasks, *data(5))
    vec = torch.stack(list(losses.values()))
    shared = list(model.shared_parameters())
    loop = task_jacobian(list(vec), shared)
    for chunk in (None, 2):
        torch.testing.assert_close(batched_task_jacobian(vec, shared, chunk), loop)
    auto = JacobianComputer("auto", trials=1)
    for _ in range(3):
        torch.testing.assert_close(auto(vec, shared), loop)
    assert auto.chosen in ("loop", "batched")


# --- loss scale, clipping, diagnostics, bf16 -------------------------------------------------------------


def test_loss_scale_does_not_change_weights_and_overflow_skips_method():
    model, tasks = hard_sharing(2)
    _, losses = model_losses(model, tasks, *data(2))
    w1 = Engine("mgda", model.shared_parameters()).backward(losses).weights
    g1 = grads(model.parameters())
    model.zero_grad()
    _, losses = model_losses(model, tasks, *data(2))
    w2 = Engine("mgda", model.shared_parameters()).backward(losses, scale=1024.0).weights
    assert w1 == pytest.approx(w2)
    for a, b in zip(g1, grads(model.parameters()), strict=True):
        torch.testing.assert_close(a * 1024.0, b)
    model.zero_grad()
    _, losses = model_losses(model, tasks, *data(2))
    report = Engine("mgda", model.shared_parameters()).backward(losses, scale=float("inf"))
    assert report.weights == {"t0": 1.0, "t1": 1.0} and "non-finite" in report.fallback
    assert not all(torch.isfinite(p.grad).all() for p in model.shared_parameters())


class Counted(Method):
    """Test method: needs J; returns its first row's direction, reading G only if told to."""

    needs = "jacobian"

    def __init__(self, read: bool) -> None:
        super().__init__()
        self.read, self.seen = read, []

    def update(self, step: Step):
        if self.read:
            self.seen.append(step.gramian.clone())
        return pt.methods.base.Update(torch.ones_like(step.losses), direction=step.jacobian[0].clone())


@pytest.mark.parametrize("read", [False, True])
def test_a_jacobian_method_s_gramian_is_formed_only_when_read(monkeypatch, read):
    """G of a Jacobian method is one product over all of J: formed when the method reads it (then in
    the report) or when the step is diagnosed, never otherwise."""
    calls = []
    formed = Engine._theta_gramian
    monkeypatch.setattr(Engine, "_theta_gramian", lambda self, j: calls.append(1) or formed(self, j))
    model, tasks = hard_sharing(3)
    shared = list(model.shared_parameters())
    method = Counted(read)
    engine = Engine(method, shared)
    _, losses = model_losses(model, tasks, *data())
    j = task_jacobian(list(losses.values()), shared)
    report = engine.backward(losses)
    assert len(calls) == int(read)
    if read:
        torch.testing.assert_close(method.seen[0], j @ j.T, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(report.gramian, j @ j.T, rtol=1e-5, atol=1e-6)
        assert report.task_norms is None  # G's diagonal has them
    else:
        assert report.gramian is None
        torch.testing.assert_close(report.task_norms, j.norm(dim=1))  # from the finiteness check
    torch.testing.assert_close(flat_grad(shared), j[0])
    for option in ("diagnose", "report_gramian"):
        model.zero_grad()
        _, losses = model_losses(model, tasks, *data())
        report = engine.backward(losses, **{option: True})
        torch.testing.assert_close(report.gramian, j @ j.T, rtol=1e-5, atol=1e-6)
    assert len(calls) == int(read) + 2


def test_a_jacobian_method_is_skipped_on_non_finite_gradients_without_its_gramian():
    """Without G, the finiteness check is on J's row norms: an overflowing step leaves MoCo's state
    untouched and the non-finite update for a scaler to discard."""
    model, tasks = hard_sharing(2)
    engine = Engine("moco", model.shared_parameters())
    _, losses = model_losses(model, tasks, *data(2))
    engine.backward(losses)
    before = {k: v.clone() for k, v in engine.method.state_dict().items() if isinstance(v, torch.Tensor)}
    model.zero_grad()
    _, losses = model_losses(model, tasks, *data(2))
    report = engine.backward(losses, scale=float("inf"))
    assert report.weights == {"t0": 1.0, "t1": 1.0} and "non-finite" in report.fallback and report.gramian is None
    for key, value in engine.method.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, before[key]), key
    assert not all(torch.isfinite(p.grad).all() for p in model.shared_parameters())


def test_step_gramian_deferred_is_formed_once_on_first_read():
    calls = []
    step = Step(tasks=("a", "b"), losses=torch.ones(2))
    assert not step.has_gramian and step.gramian is None
    step.defer_gramian(lambda: calls.append(1) or torch.eye(2))
    assert step.has_gramian and step.formed_gramian is None and not calls
    assert torch.equal(step.gramian, torch.eye(2)) and torch.equal(step.gramian, torch.eye(2))
    assert calls == [1] and torch.equal(step.formed_gramian, torch.eye(2))
    step.defer_gramian(lambda: calls.append(2) or torch.eye(2))
    step.gramian = torch.zeros(2, 2)  # a given G replaces a deferred one
    assert torch.equal(step.gramian, torch.zeros(2, 2)) and calls == [1]
    with pytest.raises(pt.core.errors.InvalidParameterError, match="needs the task Gramian"):
        Counted(False)(Step(tasks=("a", "b"), losses=torch.ones(2), jacobian=torch.ones(2, 3)))


def test_bf16_autocast_with_gradient_method():
    model, tasks = hard_sharing(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, losses = model_losses(model, tasks, *data())
    report = pt.backward(losses, model.shared_parameters(), "upgrad")
    assert all(v > 0 for v in report.weights.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_per_task_clipping_bounds_each_task_norm():
    model, tasks = hard_sharing(3)
    x, y = data()
    shared = list(model.shared_parameters())
    _, losses = model_losses(model, tasks, x, 10 * y)
    j = task_jacobian(list(losses.values()), shared)
    norms = j.norm(dim=1)
    limit = float(norms.min()) / 2  # every task is clipped
    report = Engine("equal", shared, task_clip=limit).backward(losses)
    factors = (limit / norms).clamp(max=1.0)
    assert list(report.weights.values()) == pytest.approx(factors.tolist(), rel=1e-5)
    torch.testing.assert_close(report.clip, factors, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat_grad(shared), factors @ j, rtol=1e-5, atol=1e-6)
    for row in factors[:, None] * j:
        assert float(row.norm()) <= limit * (1 + 1e-5)
    torch.testing.assert_close(report.gramian, j @ j.T, rtol=1e-5, atol=1e-5)


def test_diagnose_exposes_gramian_without_changing_the_update():
    model, tasks = hard_sharing(2)
    _, losses = model_losses(model, tasks, *data(2))
    engine = Engine("equal", model.shared_parameters())
    assert engine.backward(losses).gramian is None
    model.zero_grad()
    _, losses = model_losses(model, tasks, *data(2))
    report = engine.backward(losses, diagnose=True)
    assert report.gramian is not None and report.gramian.shape == (2, 2)
    got = grads(model.parameters())
    model.zero_grad()
    _, losses = model_losses(model, tasks, *data(2))
    j = task_jacobian(list(losses.values()), list(model.shared_parameters()))
    torch.testing.assert_close(report.gramian, j @ j.T, rtol=1e-5, atol=1e-6)
    sum(losses.values()).backward()
    for a, b in zip(got, grads(model.parameters()), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_trains_under_bf16_autocast(name):
    model, tasks = hard_sharing(3)
    x, y = data(3, 16)
    engine = Engine(build(name, [t.name for t in tasks]), model.shared_parameters(),
                    last_shared_params=model.last_shared_parameters())
    for _ in range(2):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z, losses = model_losses(model, tasks, x, y)
        report = engine.backward(losses, features=[z])
        assert all(math.isfinite(v) for v in report.weights.values()), name
        assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()), name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shared_parameters()), name


# --- methods with learnable parameters, GLS, GradNorm --------------------------------------------------


@pytest.mark.parametrize("name", ["uncertainty", "imtl_l"])
def test_engine_gradients_reach_learnable_method_parameters(name):
    torch.manual_seed(0)
    shared, head = nn.Linear(3, 4), nn.Linear(4, 2)
    method = METHODS.create(name)
    # the Trainer builds the optimizer before setup(): the parameters must keep their identity
    optimizer = torch.optim.SGD([*shared.parameters(), *head.parameters(), *method.parameters()], lr=0.1)
    method.setup(["a", "b"])
    (param,) = list(method.parameters())
    assert param.shape == (2,)
    engine = Engine(method, shared.parameters())
    assert list(engine.parameters()) == [param]
    x, y = torch.randn(16, 3), torch.randn(16)
    out = head(shared(x))
    engine.backward({"a": (out[:, 0] - y).pow(2).mean(), "b": (out[:, 1] + y).pow(2).mean()})
    assert param.grad is not None and bool((param.grad.abs() > 0).all())
    before = param.detach().clone()
    optimizer.step()
    assert not torch.equal(before, param.detach())
    other = METHODS.create(name)
    other.load_state_dict(method.state_dict())  # a fresh method adopts the saved tasks and values
    torch.testing.assert_close(next(other.parameters()), param.detach())
    assert other.all_tasks == ("a", "b")


def test_gls_gradient_is_geometric_mean_gradient_through_engine():
    torch.manual_seed(0)
    shared, head = nn.Linear(3, 4), nn.Linear(4, 2)
    x = torch.randn(8, 3)

    def losses():
        out = head(torch.tanh(shared(x)))
        return {"a": out[:, 0].pow(2).mean() + 0.1, "b": (out[:, 1] - 1).pow(2).mean() + 0.1}

    params = [*shared.parameters(), *head.parameters()]
    report = Engine("gls", shared.parameters()).backward(losses())
    got = [p.grad.clone() for p in params]
    values = losses()
    expected = torch.autograd.grad((values["a"] * values["b"]).sqrt(), params)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    a, b = values["a"].item(), values["b"].item()
    assert [report.weights["a"], report.weights["b"]] == pytest.approx(
        [math.sqrt(a * b) / (2 * a), math.sqrt(a * b) / (2 * b)], rel=1e-5)


def test_gradnorm_through_engine_on_last_shared_layer():
    torch.manual_seed(0)
    body, last, heads = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    engine = Engine("gradnorm", [*body.parameters(), *last.parameters()], last_shared_params=last.parameters())
    x = torch.randn(8, 3)

    def losses():
        out = heads(torch.relu(last(torch.relu(body(x)))))
        return {"a": out[:, 0].pow(2).mean(), "b": (3 * out[:, 1] - 1).pow(2).mean()}

    for index in range(3):
        report = engine.backward(losses())
        assert report.index == index and report.compare == "last_shared"
        assert math.isclose(report.weights["a"] + report.weights["b"], 2.0, rel_tol=1e-6)
        j = task_jacobian(list(losses().values()), list(last.parameters()))  # GradNorm's gᵢ: on the last layer
        torch.testing.assert_close(report.gramian, j @ j.T)
    assert body.weight.grad is not None and last.weight.grad is not None


# --- the step report, state, set-up, options ----------------------------------------------------------


def test_report_describes_the_step():
    model, tasks = hard_sharing(2)
    engine = Engine("upgrad", model.shared_parameters(), seed=4)
    for k in range(2):
        _, losses = model_losses(model, tasks, *data(2, seed=k))
        report = engine.backward(losses)
        assert report.index == k and report.tasks == ("t0", "t1")
        torch.testing.assert_close(report.losses, torch.stack(list(losses.values())).detach())
        assert report.task_losses == pytest.approx({t: float(v.detach()) for t, v in losses.items()})
        assert report.compare == "shared" and report.heads == "unweighted" and not report.reused
        assert report.fallback is None and report.clip is None and report.feature_gramian is None
    assert engine.index == 2 and engine.seed == 4


def test_engine_state_holds_the_counter_and_the_method_state():
    model, tasks = hard_sharing(3)
    engine = Engine("moco", model.shared_parameters())
    for k in range(3):
        _, losses = model_losses(model, tasks, *data(seed=k))
        engine.backward(losses)
    state = engine.state_dict()
    assert state["index"] == 3 and set(state["method"]) >= {"lam", "tracked", "count"}
    assert int(state["method"]["count"]) == 3  # one method call per engine step


@pytest.mark.parametrize("name", [n for n in NAMES if n != "inverse_size"])
def test_a_fresh_engine_resumes_every_method_exactly(name):
    """``Engine.state_dict`` is all a checkpoint needs: a new engine around a new, never set up
    method loads it and takes the next step exactly as the first engine does (weights and every
    gradient), epochs' hooks included."""
    model, tasks = hard_sharing(3)

    def engine() -> Engine:
        return Engine(build(name), model.shared_parameters(), last_shared_params=model.last_shared_parameters())

    first = engine()
    for k in range(3):
        model.zero_grad()
        z, losses = model_losses(model, tasks, *data(seed=k))
        first.backward(losses, features=[z])
        if k < 2:  # two epochs: DWA (Warmup's example inner method) then has loss ratios
            first.method.on_epoch_end(k, {t.name: (1.0 + i) / (1 + k * i) for i, t in enumerate(tasks)},
                                      {t.name: {"accuracy": 0.5 + 0.1 * i} for i, t in enumerate(tasks)})
    resumed = engine()
    resumed.load_state_dict(first.state_dict())
    assert resumed.index == 3
    out = []
    for e in (first, resumed):
        model.zero_grad()
        z, losses = model_losses(model, tasks, *data(seed=9))
        out.append((e.backward(losses, features=[z]), flat_grad(model.parameters())))
    (a, grads_a), (b, grads_b) = out
    assert b.index == a.index == 3 and b.weights == a.weights
    torch.testing.assert_close(grads_b, grads_a, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["uncertainty", "imtl_l", "dwa", "graddrop", "moco"])
def test_every_k_is_refused_where_weights_cannot_be_reused(name):
    """Loss weights are recomputed for free (learnable ones must see their loss every step), and a
    Jacobian method's direction is new every step: ``every > 1`` is an error for both."""
    model, _ = hard_sharing(3)
    with pytest.raises(pt.InvalidParameterError, match=f"'{name}' cannot reuse them"):
        Engine(name, model.shared_parameters(), every=2)


@pytest.mark.parametrize("name", NAMES)
def test_a_method_that_was_never_set_up_sets_itself_up(name):
    """The engine calls ``setup`` with the tasks of the first losses when nobody did."""
    model, tasks = hard_sharing(3)
    method = build(name)  # never set up
    assert not method.is_set_up
    engine = Engine(method, model.shared_parameters(), last_shared_params=model.last_shared_parameters())
    z, losses = model_losses(model, tasks, *data())
    if name == "inverse_size":  # needs the data sizes, which only setup() can give
        with pytest.raises(pt.InvalidParameterError, match="training-set size"):
            engine.backward(losses, features=[z])
        return
    report = engine.backward(losses, features=[z])
    assert method.all_tasks == ("t0", "t1", "t2")
    assert all(math.isfinite(v) for v in report.weights.values())
    model.zero_grad()
    z, losses = model_losses(model, tasks, *data(seed=1))
    losses["t1"] = None
    report = engine.backward(losses, features=[z])  # a later subset keeps the first set-up
    assert method.all_tasks == ("t0", "t1", "t2") and report.weights["t1"] == 0.0


def test_an_engine_keeps_a_method_set_up_by_the_user():
    method = build("dwa", ("t0", "t1", "t2", "t3"))
    model, tasks = hard_sharing(3)
    _, losses = model_losses(model, tasks, *data())
    Engine(method, model.shared_parameters()).backward(losses)
    assert method.all_tasks == ("t0", "t1", "t2", "t3")


@pytest.mark.parametrize("removed", ["mode", "scope"])
def test_removed_engine_options_name_compare(removed):
    model, _ = hard_sharing(2)
    with pytest.raises(pt.InvalidParameterError, match=f"`{removed}` has moved: use `compare`"):
        Engine("mgda", model.shared_parameters(), **{removed: "parameters"})


def test_index_is_not_an_argument_of_backward():
    model, tasks = hard_sharing(2)
    _, losses = model_losses(model, tasks, *data(2))
    with pytest.raises(TypeError):
        Engine("equal", model.shared_parameters()).backward(losses, index=3)



@pytest.mark.parametrize("name", ["upgrad", "graddrop"])
def test_the_kept_jacobian_storage_gives_the_fresh_storage_update_every_step(name):
    """J's storage is kept from step to step (a fresh J is faulted in page by page): over steps whose
    active tasks change (fewer rows, then all again) every update equals one from an engine that
    makes J anew each step, and ``release_memory`` frees the storage."""
    fresh_model, tasks = hard_sharing(4)
    kept_model, _ = hard_sharing(4)
    fresh = Engine(build(name, [t.name for t in tasks]), fresh_model.shared_parameters(), gramian="jacobian")
    kept = Engine(build(name, [t.name for t in tasks]), kept_model.shared_parameters(), gramian="jacobian")
    for step, active in enumerate((4, 4, 2, 3, 4)):
        for model, engine in ((fresh_model, fresh), (kept_model, kept)):
            model.zero_grad(set_to_none=True)
            _, losses = model_losses(model, tasks, *data(n_tasks=4, seed=step))
            losses = {t: (v if i < active else None) for i, (t, v) in enumerate(losses.items())}
            report = engine.backward(losses)
            if engine is fresh:
                fresh.release_memory()  # the next step makes J anew
                want = report
        assert report.weights == pytest.approx(want.weights, rel=1e-6, abs=1e-9), step
        for a, b in zip(grads(kept_model.parameters()), grads(fresh_model.parameters()), strict=True):
            torch.testing.assert_close(a, b)
    assert kept.kept_bytes == 4 * sum(p.numel() for p in kept_model.shared_parameters()) * 4  # 4 rows of float32
    kept.release_memory()
    assert kept.kept_bytes == 0


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_jacobian_pieces_give_g_and_the_update_of_the_whole_j(chunk):
    """A Gramian method's batched passes leave J in per-chunk, per-tensor blocks (no T×P copy): G and
    Jᵀw from the blocks equal those of J assembled from them, a block a chunk does not reach (None)
    counting as zeros."""
    from polytask.engine.jacobian import JacobianPieces, transpose_times

    gen = torch.Generator().manual_seed(0)
    sizes, t = [5, 3, 4], 7
    j = torch.randn(t, sum(sizes), generator=gen, dtype=torch.float64)
    j[3:, 5:8] = 0.0  # the second tensor is not reached by tasks 3…6
    chunks = []
    for start in range(0, t, chunk):
        rows = min(chunk, t - start)
        blocks = list(j[start:start + rows].split(sizes, dim=1))
        if start >= 3 and start + rows <= t and bool((blocks[1] == 0).all()):
            blocks[1] = None
        chunks.append((start, rows, [None if b is None else b.clone() for b in blocks]))
    pieces = JacobianPieces(chunks, t, sizes, j)
    assert pieces.shape == tuple(j.shape)
    torch.testing.assert_close(pieces.gramian(), gramian(j), rtol=1e-12, atol=1e-12)
    w = torch.linspace(-1.0, 2.0, t, dtype=torch.float64)
    torch.testing.assert_close(transpose_times(pieces, w), w @ j, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(transpose_times(j, w), w @ j)
    pieces.div_(4.0)
    torch.testing.assert_close(pieces.gramian(), gramian(j / 4.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 2])
@pytest.mark.parametrize("name", ["upgrad", "graddrop"])
def test_batched_passes_in_chunks_equal_the_loop(name, chunk_size):
    """`jacobian: batched` in chunks of tasks: a Gramian method takes J in pieces, a Jacobian method
    the assembled J; either update equals the loop's."""
    out = {}
    for jacobian in ("loop", "batched"):
        model, tasks = hard_sharing(n_tasks=5)
        engine = Engine(build(name, [t.name for t in tasks]), model.shared_parameters(), jacobian=jacobian,
                        chunk_size=chunk_size, gramian="jacobian")
        for i, scale in enumerate((1.0, 64.0)):
            model.zero_grad(set_to_none=True)
            _, losses = model_losses(model, tasks, *data(n_tasks=5, seed=i))
            report = engine.backward(losses, scale=scale, diagnose=True)
        out[jacobian] = (grads(model.parameters()), report)
    for a, b in zip(out["loop"][0], out["batched"][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["batched"][1].gramian, out["loop"][1].gramian, rtol=1e-5, atol=1e-6)


def test_task_jacobian_writes_into_given_storage():
    model, tasks = hard_sharing(3)
    _, losses = model_losses(model, tasks, *data())
    params = list(model.shared_parameters())
    want = task_jacobian(list(losses.values()), params)
    storage = torch.full((5, want.shape[1]), float("nan"))
    got = task_jacobian(list(losses.values()), params, out=storage)
    assert torch.equal(got, want) and got.data_ptr() == storage.data_ptr()
