"""Loss-weighting methods against their papers' formulas on hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from polytask.core.errors import InvalidParameterError
from polytask.engine.backward import Engine
from polytask.methods import METHODS, Step, get_method
from polytask.methods.gradnorm import gradnorm_targets

AB = ("a", "b")


def make_step(losses, tasks=AB, *, gramian=None, index=0, seed=None) -> Step:
    gen = None if seed is None else torch.Generator().manual_seed(seed)
    return Step(tasks=tuple(tasks), losses=torch.tensor(losses, dtype=torch.float64), index=index,
                gramian=None if gramian is None else torch.tensor(gramian, dtype=torch.float64), generator=gen)


def fresh(name: str, tasks=AB, **params):
    method = get_method(name, **params)
    method.setup(list(tasks), sizes={t: 10 for t in tasks})
    return method


def close(actual, expected, tol=1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------------- inverse_size
def test_inverse_size_on_sizes_100_1000_10000() -> None:
    method = get_method("inverse_size")
    method.setup(["a", "b", "c"], sizes={"a": 100, "b": 1000, "c": 10000})
    close(method.weights(make_step([1.0, 1.0, 1.0], ("a", "b", "c"))), [300 / 111, 30 / 111, 3 / 111])
    close(method.weights(make_step([1.0, 1.0], ("c", "a"))), [3 / 111, 300 / 111])  # by name, not position
    root = get_method("inverse_size", alpha=0.5)
    root.setup(["a", "b"], sizes={"a": 100, "b": 10000})
    close(root.weights(make_step([1.0, 1.0])), [2 * 0.1 / 0.11, 2 * 0.01 / 0.11])


def test_inverse_size_errors() -> None:
    with pytest.raises(InvalidParameterError, match="training-set size"):
        get_method("inverse_size").setup(["a", "b"])
    with pytest.raises(InvalidParameterError, match="no training-set size for task"):
        get_method("inverse_size").setup(["a", "b"], sizes={"a": 3})
    with pytest.raises(InvalidParameterError, match="Did you mean 'a'"):
        get_method("inverse_size").setup(["a", "b"], sizes={"a": 3, "b": 4, "aa": 1})
    with pytest.raises(InvalidParameterError, match="must be >= 0; found -1"):
        get_method("inverse_size", alpha=-1)


# ------------------------------------------------------------------------------------ uncertainty
def test_uncertainty_loss_matches_kendall() -> None:
    method = fresh("uncertainty", forms={"b": "classification"})
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([0.5, -1.0]))  # s = log σ²
    losses = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    step = make_step([2.0, 3.0])
    total = (method.weights(step) * losses).sum() + method.penalty(step, losses)
    sigma2 = torch.tensor([math.exp(0.5), math.exp(-1.0)])
    expected = 2.0 / (2 * sigma2[0]) + math.log(sigma2[0].sqrt()) + 3.0 / sigma2[1] + math.log(sigma2[1].sqrt())
    close(total, expected)
    total.backward()
    close(method.log_vars.grad, [-0.5 * math.exp(-0.5) * 2.0 + 0.5, -math.exp(1.0) * 3.0 + 0.5])


def test_uncertainty_rejects_unknown_form_and_task() -> None:
    with pytest.raises(InvalidParameterError, match="'regression' or 'classification'"):
        get_method("uncertainty", forms={"a": "ranking"})
    with pytest.raises(InvalidParameterError, match="unknown task 'c'"):
        fresh("uncertainty", forms={"c": "regression"})


# -------------------------------------------------------------------------------------------- dwa
def test_dwa_weights_from_two_previous_epochs() -> None:
    method = fresh("dwa")
    close(method.weights(make_step([1.0, 2.0])), [1.0, 1.0])
    method.on_epoch_end(0, {"a": 1.0, "b": 2.0})
    close(method.weights(make_step([1.0, 2.0])), [1.0, 1.0])
    method.on_epoch_end(1, {"a": 0.5, "b": 1.8})
    r = torch.tensor([0.5 / 1.0, 1.8 / 2.0], dtype=torch.float64)
    expected = 2 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    close(method.weights(make_step([9.0, 9.0])), expected)  # current losses play no part
    close(expected, [0.9003320053750442, 1.0996679946249558])
    method.on_epoch_end(2, {"a": 0.25, "b": 1.8})  # r = (0.5, 1.0)
    close(method.weights(make_step([1.0, 1.0])), 2 * torch.softmax(torch.tensor([0.25, 0.5]), 0))


def test_dwa_state_round_trip() -> None:
    method = fresh("dwa", temperature=0.5)
    for epoch, losses in enumerate([{"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 0.9}]):
        method.on_epoch_end(epoch, losses)
    state = method.state_dict()
    for other in (fresh("dwa", temperature=0.5), get_method("dwa", temperature=0.5)):  # set up / fresh
        other.load_state_dict(state)
        close(other.weights(make_step([1.0, 1.0])), method.weights(make_step([1.0, 1.0])))
        other.on_epoch_end(2, {"a": 0.5, "b": 0.5})
        method.on_epoch_end(2, {"a": 0.5, "b": 0.5})
        close(other.weights(make_step([1.0, 1.0])), method.weights(make_step([1.0, 1.0])))
    with pytest.raises(InvalidParameterError, match="same order"):
        fresh("dwa", tasks=("b", "a"), temperature=0.5).load_state_dict(state)


# --------------------------------------------------------------------------------------- gradnorm
def test_gradnorm_targets() -> None:
    norms, w = torch.tensor([1.0, 2.0]), torch.ones(2)
    losses, initial = torch.tensor([0.5, 1.0]), torch.ones(2)
    # L̃ = (0.5, 1), r = L̃ / 0.75 = (2/3, 4/3), Ḡ = 1.5
    close(gradnorm_targets(norms, w, losses, initial, 1.0), [1.0, 2.0])
    close(gradnorm_targets(norms, w, losses, initial, 2.0), [1.5 * 4 / 9, 1.5 * 16 / 9])
    close(gradnorm_targets(norms, w, losses, initial, 0.0), [1.5, 1.5])


def test_gradnorm_update_and_state() -> None:
    method = fresh("gradnorm", alpha=1.0, lr=0.1)
    assert method.needs == "gramian" and method.scope == "last_shared"
    step = make_step([2.0, 3.0], gramian=[[1.0, 0.0], [0.0, 4.0]])
    close(method.weights(step), [1.0, 1.0])  # the step uses the current weights
    close(method.initial_losses, [2.0, 3.0])
    # r = 1, target = Ḡ = 1.5; wᵢ‖gᵢ‖ = (1, 2) → ∂/∂w = (−1, +2) → w = (1.1, 0.8) → Σ w = 2
    close(method.task_weights, torch.tensor([1.1, 0.8]) * 2 / 1.9)
    other = fresh("gradnorm", alpha=1.0, lr=0.1)
    other.load_state_dict(method.state_dict())
    nxt = make_step([1.0, 3.0], gramian=[[2.0, 0.5], [0.5, 1.0]])
    close(other.weights(nxt), method.weights(nxt))
    close(other.task_weights, method.task_weights)
    close(method.task_weights.sum(), 2.0)


# -------------------------------------------------------------------------------------------- rlw
def test_rlw_is_scaled_softmax_of_seeded_normals() -> None:
    method = fresh("rlw", tasks=("a", "b", "c"))
    w = method.weights(make_step([1.0, 2.0, 3.0], ("a", "b", "c"), seed=7))
    z = torch.randn(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    close(w, 3 * torch.softmax(z, 0))
    close(method.weights(make_step([1.0, 2.0, 3.0], ("c", "a", "b"), seed=7)), w[[2, 0, 1]])
    close(method.weights(make_step([1.0, 2.0], ("a", "c"), seed=7)), 2 * torch.softmax(z[[0, 2]], 0))


# -------------------------------------------------------------------------------------------- gls
def test_gls_gradient_is_geometric_mean_gradient_through_engine() -> None:
    torch.manual_seed(0)
    shared, head = nn.Linear(3, 4), nn.Linear(4, 2)
    x = torch.randn(8, 3)

    def losses():
        out = head(torch.tanh(shared(x)))
        return {"a": out[:, 0].pow(2).mean() + 0.1, "b": (out[:, 1] - 1).pow(2).mean() + 0.1}

    params = [*shared.parameters(), *head.parameters()]
    engine = Engine("gls", list(shared.parameters()))
    engine.method.setup(list(AB))
    weights = engine.backward(losses())
    got = [p.grad.clone() for p in params]
    values = losses()
    geometric = (values["a"] * values["b"]).sqrt()
    expected = torch.autograd.grad(geometric, params)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    a, b = values["a"].item(), values["b"].item()
    close([weights["a"], weights["b"]], [math.sqrt(a * b) / (2 * a), math.sqrt(a * b) / (2 * b)], tol=1e-5)


# ------------------------------------------------------------------------------------------- stch
def test_stch_weights_are_softmax() -> None:
    method = fresh("stch", mu=0.5)
    close(method.weights(make_step([1.0, 2.0])), torch.softmax(torch.tensor([2.0, 4.0]), 0))
    # Σ wᵢ ∇Lᵢ = ∇ μ log Σ exp(Lᵢ/μ)
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(0.5 * torch.logsumexp(losses / 0.5, 0), losses)
    close(method.weights(make_step([1.0, 2.0])), grad)


def test_stch_nadir_from_warmup_epochs() -> None:
    method = fresh("stch", mu=1.0, warmup_epochs=2)
    close(method.weights(make_step([1.0, 2.0])), [1.0, 1.0])
    method.on_epoch_end(0, {"a": 2.0, "b": 8.0})
    method.on_epoch_end(1, {"a": 4.0, "b": 4.0})
    method.on_epoch_end(2, {"a": 100.0, "b": 100.0})  # after the warm-up: ignored
    nadir = torch.tensor([3.0, 6.0], dtype=torch.float64)
    losses = torch.tensor([3.0, 3.0], dtype=torch.float64)
    close(method.weights(make_step(losses.tolist())), torch.softmax(losses / nadir, 0) / nadir)


# ------------------------------------------------------------------------------------------- famo
def test_famo_weights_and_logit_updates_match_adam() -> None:
    method = fresh("famo", lr=0.1, weight_decay=0.01)
    history = [[1.0, 2.0], [0.5, 1.8], [0.45, 1.0], [0.4, 0.9]]
    logits = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([logits], lr=0.1, weight_decay=0.01)
    previous = None
    for losses in history:
        current = torch.tensor(losses, dtype=torch.float64)
        if previous is not None:
            delta = previous.log() - current.log()
            adam.zero_grad()
            (torch.softmax(logits, 0) * delta).sum().backward()
            adam.step()
        w = method.weights(make_step(losses))
        z = torch.softmax(logits.detach(), 0)
        close(w, (z / current) / (z / current).sum())
        close(method.logits, logits.detach())
        previous = current
    close(method.weights(make_step([1.0, 2.0])).sum(), 1.0)


def test_famo_first_weights_and_state_round_trip() -> None:
    method = fresh("famo")
    close(method.weights(make_step([1.0, 2.0])), [2 / 3, 1 / 3])  # z = ½: w ∝ 1/L
    for losses in ([0.8, 1.9], [0.5, 1.9]):
        method.weights(make_step(losses))
    other = fresh("famo")
    other.load_state_dict(method.state_dict())
    for losses in ([0.4, 1.5], [0.3, 1.4]):
        close(other.weights(make_step(losses)), method.weights(make_step(losses)))
    close(other.logits, method.logits)
    assert bool((method.logits[0] < method.logits[1]).item())  # the faster task loses weight


# -------------------------------------------------------------------------------------------- dtp
def test_dtp_focal_weights_and_ema() -> None:
    method = fresh("dtp", gamma=2.0, ema=0.5)
    close(method.weights(make_step([1.0, 1.0])), [1.0, 1.0])
    method.on_epoch_end(0, {"a": 1.0, "b": 1.0}, {"a": {"accuracy": 0.8, "f1": 0.1}})
    close(method.weights(make_step([1.0, 1.0])), [-(0.2 ** 2) * math.log(0.8), 1.0])
    method.on_epoch_end(1, {}, {"a": {"accuracy": 0.6}, "b": {"accuracy": 0.5}})
    kappa = torch.tensor([0.7, 0.5])
    close(method.weights(make_step([1.0, 1.0])), -(1 - kappa) ** 2 * kappa.log())
    other = fresh("dtp", gamma=2.0, ema=0.5)
    other.load_state_dict(method.state_dict())
    close(other.kappa, method.kappa)


def test_dtp_kpi_errors_and_choice() -> None:
    method = fresh("dtp")
    with pytest.raises(InvalidParameterError, match="no metric of task 'a' usable as a KPI"):
        method.on_epoch_end(0, {}, {"a": {"loss": 0.3, "rmse": 3.2, "r2": 0.5}})
    with pytest.raises(InvalidParameterError, match="higher-is-better KPI in \\[0, 1\\]"):
        fresh("dtp", kpis={"a": "r2"}).on_epoch_end(0, {}, {"a": {"r2": -0.5}})
    method.on_epoch_end(0, {}, {"a": {"loss": 0.3, "accuracy": 0.25}})  # skips the loss
    close(method.weights(make_step([1.0], ("a",))), [-(0.75 ** 2) * math.log(0.25)])
    with pytest.raises(InvalidParameterError, match="not among its metrics"):
        fresh("dtp", kpis={"a": "f1"}).on_epoch_end(0, {}, {"a": {"accuracy": 0.3}})
    with pytest.raises(InvalidParameterError, match="higher-is-better"):
        get_method("dtp", kpis={"a": "mae"})
    chosen = fresh("dtp", gamma=1.0, kpis={"a": "f1"})
    chosen.on_epoch_end(0, {}, {"a": {"accuracy": 0.9, "f1": 0.5}})
    close(chosen.weights(make_step([1.0], ("a",))), [-0.5 * math.log(0.5)])


# ----------------------------------------------------------------------------------------- db_mtl
def test_db_mtl_matches_paper_update_without_averaging() -> None:
    torch.manual_seed(1)
    jac = torch.randn(3, 5, dtype=torch.float64)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    method = fresh("db_mtl", tasks=("a", "b", "c"), beta=0.0)
    w = method.weights(make_step(losses.tolist(), ("a", "b", "c"), gramian=(jac @ jac.T).tolist()))
    log_grads = jac / losses[:, None]  # ∇ log Lᵢ
    norms = log_grads.norm(dim=1)
    expected = norms.max() * (log_grads / norms[:, None]).sum(0)
    close(w @ jac, expected)


def test_db_mtl_averages_gradient_norms() -> None:
    method = fresh("db_mtl", beta=0.5)
    method.weights(make_step([1.0, 2.0], gramian=[[4.0, 0.0], [0.0, 1.0]]))  # ‖ĝ‖ = (2, 0.5)
    close(method.norms, [2.0, 0.5])
    w = method.weights(make_step([1.0, 1.0], gramian=[[1.0, 0.0], [0.0, 1.0]]))  # ‖ĝ‖ = (1, 1)
    close(method.norms, [1.5, 0.75])
    close(w, [1.5 / 1.5, 1.5 / 0.75])


# ------------------------------------------------------------------------------------------- imtl_l
def test_imtl_l_loss() -> None:
    method = fresh("imtl_l")
    with torch.no_grad():
        method.log_scales.copy_(torch.tensor([0.3, -0.2]))
    losses = torch.tensor([2.0, 5.0], dtype=torch.float64)
    step = make_step(losses.tolist())
    total = (method.weights(step) * losses).sum() + method.penalty(step, losses)
    close(total, math.exp(0.3) * 2 - 0.3 + math.exp(-0.2) * 5 + 0.2)


# --------------------------------------------------------------------------------- learnable, e2e
@pytest.mark.parametrize("name", ["uncertainty", "imtl_l"])
def test_engine_gradients_reach_learnable_method_parameters(name: str) -> None:
    torch.manual_seed(0)
    shared, head = nn.Linear(3, 4), nn.Linear(4, 2)
    method = get_method(name)
    # the Trainer builds the optimizer before setup(): the parameters must keep their identity
    optimizer = torch.optim.SGD([*shared.parameters(), *head.parameters(), *method.parameters()], lr=0.1)
    method.setup(list(AB))
    (param,) = list(method.parameters())
    assert param.shape == (2,)
    engine = Engine(method, list(shared.parameters()))
    x, y = torch.randn(16, 3), torch.randn(16)
    out = head(shared(x))
    engine.backward({"a": (out[:, 0] - y).pow(2).mean(), "b": (out[:, 1] + y).pow(2).mean()})
    assert param.grad is not None and bool((param.grad.abs() > 0).all())
    before = param.detach().clone()
    optimizer.step()
    assert not torch.equal(before, param.detach())
    state = method.state_dict()
    other = get_method(name)
    other.load_state_dict(state)  # a fresh method adopts the saved tasks and values
    close(next(other.parameters()), param.detach())
    assert other.all_tasks == AB


def test_gradnorm_through_engine_on_last_shared_layer() -> None:
    torch.manual_seed(0)
    body, last, heads = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 2)
    engine = Engine("gradnorm", list(last.parameters()))
    engine.method.setup(list(AB))
    x = torch.randn(8, 3)
    for index in range(3):
        out = heads(torch.relu(last(torch.relu(body(x)))))
        w = engine.backward({"a": out[:, 0].pow(2).mean(), "b": (3 * out[:, 1] - 1).pow(2).mean()}, index=index)
        assert math.isclose(w["a"] + w["b"], 2.0, rel_tol=1e-6)
    assert body.weight.grad is not None and last.weight.grad is not None


# ----------------------------------------------------------------------------------------- warmup
def test_warmup_blends_static_and_inner_weights() -> None:
    method = get_method("warmup", inner="stch", inner_params={"mu": 1.0}, steps=10, weights={"a": 3.0})
    method.setup(list(AB))
    lam = torch.tensor([3.0, 1.0], dtype=torch.float64)
    inner = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64), 0)
    for index, a in ((0, 0.0), (5, 0.5), (10, 1.0), (20, 1.0)):
        close(method.weights(make_step([1.0, 2.0], index=index)), (1 - a) * lam + a * inner)


def test_warmup_delegates_and_keeps_inner_state() -> None:
    method = get_method("warmup", inner="gradnorm", inner_params={"lr": 0.1}, steps=4)
    assert method.needs == "gramian" and method.scope == "last_shared"
    method.setup(list(AB))
    method.weights(make_step([2.0, 3.0], gramian=[[1.0, 0.0], [0.0, 4.0]]))
    state = method.state_dict()
    assert "inner.task_weights" in state and not torch.equal(state["inner.task_weights"], torch.ones(2))
    other = get_method("warmup", inner="gradnorm", inner_params={"lr": 0.1}, steps=4)
    other.setup(list(AB))
    other.load_state_dict(state)
    nxt = make_step([1.0, 3.0], gramian=[[2.0, 0.5], [0.5, 1.0]], index=2)
    close(other.weights(nxt), method.weights(nxt))
    dwa = get_method("warmup", inner="dwa", steps=2)
    dwa.setup(list(AB))
    dwa.on_epoch_end(0, {"a": 1.0, "b": 1.0})
    assert int(dwa.inner.epochs_seen[0]) == 1


def test_warmup_scales_the_inner_penalty() -> None:
    method = get_method("warmup", inner="uncertainty", steps=4)
    method.setup(list(AB))
    with torch.no_grad():
        method.inner.log_vars.fill_(1.0)
    losses = torch.ones(2, dtype=torch.float64)
    close(method.penalty(make_step([1.0, 1.0], index=0), losses), 0.0)
    close(method.penalty(make_step([1.0, 1.0], index=2), losses), 0.5 * 1.0)
    with pytest.raises(InvalidParameterError, match="must be an int >= 0"):
        get_method("warmup", inner="dwa", steps=-1)
    with pytest.raises(InvalidParameterError, match="unknown method"):
        get_method("warmup", inner="dwx", steps=1)


# ------------------------------------------------------------------------------------ all of them
MINE = ["inverse_size", "uncertainty", "imtl_l", "dwa", "rlw", "gls", "stch", "gradnorm", "db_mtl", "famo", "dtp",
        "warmup"]
PARAMS = {"warmup": {"inner": "famo", "steps": 3}}


@pytest.mark.parametrize("name", MINE)
def test_subset_of_tasks_and_exact_resume(name: str) -> None:
    assert name in METHODS
    tasks = ("a", "b", "c")
    torch.manual_seed(0)
    jac = torch.randn(3, 6, dtype=torch.float64)
    method = fresh(name, tasks, **PARAMS.get(name, {}))

    def step(index: int, active) -> Step:
        rows = [tasks.index(t) for t in active]
        losses = (1.0 + 0.5 * torch.rand(len(rows), dtype=torch.float64)).tolist()
        return make_step(losses, active, gramian=(jac[rows] @ jac[rows].T).tolist(), index=index, seed=index)

    for index, active in enumerate([tasks, ("c", "a"), tasks]):
        w = method.weights(step(index, active))
        assert w.shape == (len(active),) and bool(torch.isfinite(w).all())
    method.on_epoch_end(0, {"a": 1.0, "b": 2.0, "c": 3.0}, {t: {"accuracy": 0.5} for t in tasks})
    other = fresh(name, tasks, **PARAMS.get(name, {}))
    other.load_state_dict(method.state_dict())
    for index, active in enumerate([("b",), tasks], start=3):
        steps = []
        for _ in range(2):  # the same losses and a fresh generator with the same seed for each
            torch.manual_seed(index)
            steps.append(step(index, active))
        close(other.weights(steps[0]), method.weights(steps[1]))
