"""Methods whose weights depend on what they kept from earlier steps or epochs: DWA, GradNorm, FAMO,
STCH, DTP, DB-MTL, Warmup, MoCo, GREAT, GradVac, Nash-MTL. Their update rules step by step, their
state round trips, and the contract that each call ``method(step)`` advances the state once."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.core.errors import InvalidParameterError
from polytask.methods import Step, get_method
from polytask.methods._simplex import project_simplex

from .helpers import build, jac, make_step, weights_of

AB = ("a", "b")
ABC = ("a", "b", "c")


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny tensors: one intra-op thread is faster on a shared machine."""


def loss_step(losses, tasks=AB, *, gramian=None, index=0, seed=0) -> Step:
    return Step(tasks=tuple(tasks), losses=torch.tensor(losses, dtype=torch.float64), index=index, seed=seed,
                gramian=None if gramian is None else torch.tensor(gramian, dtype=torch.float64))


def w(method, *args, **kwargs) -> torch.Tensor:
    """The weights of one call (one step) of ``method``."""
    return method(loss_step(*args, **kwargs)).weights


def close(actual, expected, tol=1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


# --- DWA --------------------------------------------------------------------------------------------


def test_dwa_weights_from_two_previous_epochs():
    method = build("dwa", AB)
    close(w(method, [1.0, 2.0]), [1.0, 1.0])
    method.on_epoch_end(0, {"a": 1.0, "b": 2.0})
    close(w(method, [1.0, 2.0]), [1.0, 1.0])
    method.on_epoch_end(1, {"a": 0.5, "b": 1.8})
    r = torch.tensor([0.5 / 1.0, 1.8 / 2.0], dtype=torch.float64)
    expected = 2 * torch.exp(r / 2) / torch.exp(r / 2).sum()
    close(w(method, [9.0, 9.0]), expected)  # current losses play no part
    close(expected, [0.9003320053750442, 1.0996679946249558])
    method.on_epoch_end(2, {"a": 0.25, "b": 1.8})  # r = (0.5, 1.0)
    close(w(method, [1.0, 1.0]), 2 * torch.softmax(torch.tensor([0.25, 0.5]), 0))


def test_dwa_state_round_trip():
    method = build("dwa", AB, temperature=0.5)
    for epoch, losses in enumerate([{"a": 2.0, "b": 1.0}, {"a": 1.0, "b": 0.9}]):
        method.on_epoch_end(epoch, losses)
    state = method.state_dict()
    for other in (build("dwa", AB, temperature=0.5), get_method("dwa", temperature=0.5)):  # set up / fresh
        other.load_state_dict(state)
        close(w(other, [1.0, 1.0]), w(method, [1.0, 1.0]))
        other.on_epoch_end(2, {"a": 0.5, "b": 0.5})
        method.on_epoch_end(2, {"a": 0.5, "b": 0.5})
        close(w(other, [1.0, 1.0]), w(method, [1.0, 1.0]))
    with pytest.raises(InvalidParameterError, match="same order"):
        build("dwa", ("b", "a"), temperature=0.5).load_state_dict(state)


# --- GradNorm -----------------------------------------------------------------------------------


def test_gradnorm_update_and_state():
    method = build("gradnorm", AB, alpha=1.0, lr=0.1)
    assert method.needs == "gramian" and method.compare == "last_shared"
    close(w(method, [2.0, 3.0], gramian=[[1.0, 0.0], [0.0, 4.0]]), [1.0, 1.0])  # the step uses the current weights
    close(method.initial_losses, [2.0, 3.0])
    # r = 1, target = Ḡ = 1.5; wᵢ‖gᵢ‖ = (1, 2) → ∂/∂w = (−1, +2) → w = (1.1, 0.8) → Σ w = 2
    close(method.task_weights, torch.tensor([1.1, 0.8]) * 2 / 1.9)
    other = build("gradnorm", AB, alpha=1.0, lr=0.1)
    other.load_state_dict(method.state_dict())
    nxt = dict(gramian=[[2.0, 0.5], [0.5, 1.0]])
    close(w(other, [1.0, 3.0], **nxt), w(method, [1.0, 3.0], **nxt))
    close(other.task_weights, method.task_weights)
    close(method.task_weights.sum(), 2.0)


# --- FAMO ---------------------------------------------------------------------------------------


def test_famo_weights_and_logit_updates_match_adam():
    method = build("famo", AB, lr=0.1, weight_decay=0.01)
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
        z = torch.softmax(logits.detach(), 0)
        close(w(method, losses), (z / current) / (z / current).sum())
        close(method.logits, logits.detach())
        previous = current
    close(w(method, [1.0, 2.0]).sum(), 1.0)


def test_famo_first_weights_and_state_round_trip():
    method = build("famo", AB)
    close(w(method, [1.0, 2.0]), [2 / 3, 1 / 3])  # z = ½: w ∝ 1/L
    for losses in ([0.8, 1.9], [0.5, 1.9]):
        w(method, losses)
    other = build("famo", AB)
    other.load_state_dict(method.state_dict())
    for losses in ([0.4, 1.5], [0.3, 1.4]):
        close(w(other, losses), w(method, losses))
    close(other.logits, method.logits)
    assert bool((method.logits[0] < method.logits[1]).item())  # the faster task loses weight


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_famo_a_non_finite_loss_leaves_its_state_as_a_missing_loss_would(bad):
    """One NaN (or infinite) loss made every logit NaN for good, silently. It now moves no logit and
    is not kept as the next step's "before": the state is the one a step without that task's loss
    leaves, and the weights after it are finite."""
    history = [[1.0, 2.0, 0.5], [0.8, 1.9, 0.45], [0.7, 1.8, 0.4], [0.6, 1.6, 0.38], [0.55, 1.5, 0.35]]
    runs = []
    for missing in (False, True):
        method = build("famo", ABC, lr=0.1)
        weights = []
        for index, losses in enumerate(history):
            if index == 2 and missing:
                weights.append(w(method, [losses[1], losses[2]], tasks=("b", "c")))
                continue
            weights.append(w(method, [bad if index == 2 else losses[0], *losses[1:]], tasks=ABC))
        runs.append((weights, {k: getattr(method, k).clone() for k in method.host_buffers}))
    (weights, state), (_, without) = runs
    for key, value in without.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, equal_nan=True, msg=key)
    assert all(torch.isfinite(x).all() for x in weights[3:])
    assert math.isfinite(float(state["logits"].sum()))


# --- STCH, DTP, DB-MTL ------------------------------------------------------------------------------


def test_stch_nadir_from_warmup_epochs():
    method = build("stch", AB, mu=1.0, warmup_epochs=2)
    close(w(method, [1.0, 2.0]), [1.0, 1.0])
    method.on_epoch_end(0, {"a": 2.0, "b": 8.0})
    method.on_epoch_end(1, {"a": 4.0, "b": 4.0})
    method.on_epoch_end(2, {"a": 100.0, "b": 100.0})  # after the warm-up: ignored
    nadir = torch.tensor([3.0, 6.0], dtype=torch.float64)
    losses = torch.tensor([3.0, 3.0], dtype=torch.float64)
    close(w(method, losses.tolist()), torch.softmax(losses / nadir, 0) / nadir)


def test_dtp_focal_weights_and_ema():
    method = build("dtp", AB, gamma=2.0, ema=0.5)
    close(w(method, [1.0, 1.0]), [1.0, 1.0])
    method.on_epoch_end(0, {"a": 1.0, "b": 1.0}, {"a": {"accuracy": 0.8, "f1": 0.1}})
    close(w(method, [1.0, 1.0]), [-(0.2 ** 2) * math.log(0.8), 1.0])
    method.on_epoch_end(1, {}, {"a": {"accuracy": 0.6}, "b": {"accuracy": 0.5}})
    kappa = torch.tensor([0.7, 0.5])
    close(w(method, [1.0, 1.0]), -(1 - kappa) ** 2 * kappa.log())
    other = build("dtp", AB, gamma=2.0, ema=0.5)
    other.load_state_dict(method.state_dict())
    close(other.kappa, method.kappa)


def test_dtp_kpi_errors_and_choice():
    method = build("dtp", AB)
    with pytest.raises(InvalidParameterError, match="no metric of task 'a' usable as a KPI"):
        method.on_epoch_end(0, {}, {"a": {"loss": 0.3, "rmse": 3.2, "r2": 0.5}})
    with pytest.raises(InvalidParameterError, match="higher-is-better KPI in \\[0, 1\\]"):
        build("dtp", AB, kpis={"a": "r2"}).on_epoch_end(0, {}, {"a": {"r2": -0.5}})
    method.on_epoch_end(0, {}, {"a": {"loss": 0.3, "accuracy": 0.25}})  # skips the loss
    close(w(method, [1.0], ("a",)), [-(0.75 ** 2) * math.log(0.25)])
    with pytest.raises(InvalidParameterError, match="not among its metrics"):
        build("dtp", AB, kpis={"a": "f1"}).on_epoch_end(0, {}, {"a": {"accuracy": 0.3}})
    chosen = build("dtp", AB, gamma=1.0, kpis={"a": "f1"})
    chosen.on_epoch_end(0, {}, {"a": {"accuracy": 0.9, "f1": 0.5}})
    close(w(chosen, [1.0], ("a",)), [-0.5 * math.log(0.5)])


def test_db_mtl_averages_gradient_norms():
    method = build("db_mtl", AB, beta=0.5)
    w(method, [1.0, 2.0], gramian=[[4.0, 0.0], [0.0, 1.0]])  # ‖ĝ‖ = (2, 0.5)
    close(method.norms, [2.0, 0.5])
    weights = w(method, [1.0, 1.0], gramian=[[1.0, 0.0], [0.0, 1.0]])  # ‖ĝ‖ = (1, 1)
    close(method.norms, [1.5, 0.75])
    close(weights, [1.5 / 1.5, 1.5 / 0.75])


# --- Warmup -------------------------------------------------------------------------------------


def test_warmup_blends_static_and_inner_weights():
    method = get_method("warmup", inner="stch", inner_params={"mu": 1.0}, steps=10, weights={"a": 3.0})
    method.setup(list(AB))
    lam = torch.tensor([3.0, 1.0], dtype=torch.float64)
    inner = torch.softmax(torch.tensor([1.0, 2.0], dtype=torch.float64), 0)
    for index, a in ((0, 0.0), (5, 0.5), (10, 1.0), (20, 1.0)):
        close(w(method, [1.0, 2.0], index=index), (1 - a) * lam + a * inner)


def test_warmup_delegates_and_keeps_inner_state():
    method = get_method("warmup", inner="gradnorm", inner_params={"lr": 0.1}, steps=4)
    assert method.needs == "gramian" and method.compare == "last_shared"
    method.setup(list(AB))
    w(method, [2.0, 3.0], gramian=[[1.0, 0.0], [0.0, 4.0]])
    state = method.state_dict()
    assert "inner.task_weights" in state and not torch.equal(state["inner.task_weights"], torch.ones(2))
    other = get_method("warmup", inner="gradnorm", inner_params={"lr": 0.1}, steps=4)
    other.setup(list(AB))
    other.load_state_dict(state)
    nxt = dict(gramian=[[2.0, 0.5], [0.5, 1.0]], index=2)
    close(w(other, [1.0, 3.0], **nxt), w(method, [1.0, 3.0], **nxt))
    dwa = get_method("warmup", inner="dwa", steps=2)
    dwa.setup(list(AB))
    dwa.on_epoch_end(0, {"a": 1.0, "b": 1.0})
    assert int(dwa.inner.epochs_seen[0]) == 1


def test_warmup_scales_the_inner_penalty():
    method = get_method("warmup", inner="uncertainty", steps=4)
    method.setup(list(AB))
    with torch.no_grad():
        method.inner.log_vars.fill_(1.0)
    close(method(loss_step([1.0, 1.0], index=0)).penalty, 0.0)
    close(method(loss_step([1.0, 1.0], index=2)).penalty, 0.5 * 1.0)


# --- MoCo ---------------------------------------------------------------------------------------


def moco_step(j, tasks=ABC, seed=0):
    return make_step("moco", j, torch.ones(len(j), dtype=j.dtype), tasks=tasks, seed=seed)


def test_moco_lambda_stays_on_the_simplex_with_task_subsets():
    method = build("moco", ABC, gamma=5.0, rho=0.1)
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        tasks = ABC if i % 3 else ("c", "a")
        j = torch.randn(len(tasks), 8, generator=gen, dtype=torch.float64)
        update = method(moco_step(j, tasks))
        assert bool((update.weights >= 0).all()) and abs(float(update.weights.sum()) - 1) < 1e-9
        assert bool((method.lam >= 0).all()) and abs(float(method.lam.sum()) - 1) < 1e-9
        assert update.direction.shape == (8,)


def test_moco_follows_algorithm_1():
    beta, gamma, rho = 0.3, 0.2, 0.05
    method = build("moco", ABC, beta=beta, beta_sigma=0.0, gamma=gamma, gamma_sigma=0.0, rho=rho)
    y, lam = None, torch.full((3,), 1 / 3, dtype=torch.float64)
    for k in range(4):
        j = jac(20 + k, 3, 10)
        update = method(moco_step(j))
        y = j.clone() if y is None else y - beta * (y - j)
        lam = project_simplex(lam - gamma * (y @ y.T + rho * torch.eye(3, dtype=y.dtype)) @ lam)
        torch.testing.assert_close(update.weights, lam)
        torch.testing.assert_close(update.direction, lam @ y)


def test_moco_state_round_trips_into_a_fresh_method():
    method = build("moco", ABC)
    for k in range(3):
        method(moco_step(jac(k, 3, 10)))
    fresh = get_method("moco")
    fresh.load_state_dict(method.state_dict())
    step = moco_step(jac(9, 3, 10))
    a, b = fresh(step), method(step)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.direction, b.direction)


# --- GREAT --------------------------------------------------------------------------------------


def separable_steps(n: int, p: int = 16) -> list[Step]:
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, p, generator=gen)
    return [make_step("great", centres + torch.randn(3, p, generator=gen), torch.ones(3), tasks=ABC, index=i)
            for i in range(n)]


def test_great_discriminator_learns_and_the_adversarial_term_confuses_it():
    method = build("great", ABC, strength=0.2, lr=1e-2)
    losses = []
    for step in separable_steps(40):
        method(step)
        losses.append(float(method.last_loss))
    assert losses[-1] < 0.2 * losses[0]
    step = separable_steps(41)[-1]
    j = step.jacobian
    d = method(step).direction  # this step's call: one more discriminator step, then the direction
    pushed = j + 0.2 * j.norm(dim=1, keepdim=True) * method.adversarial(step)
    torch.testing.assert_close(d, pushed.sum(dim=0))
    unit = j / j.norm(dim=1, keepdim=True)
    moved = pushed / pushed.norm(dim=1, keepdim=True)
    with torch.no_grad():
        assert method.discriminator_loss(step, units=moved) > method.discriminator_loss(step, units=unit)


def test_great_state_round_trips_exactly():
    method = build("great", ABC, lr=1e-2)
    steps = separable_steps(6)
    for step in steps[:3]:
        method(step)
    fresh = build("great", ABC, lr=1e-2)
    fresh.load_state_dict(method.state_dict())
    for step in steps[3:]:
        a, b = fresh(step), method(step)
        assert torch.equal(a.weights, b.weights) and torch.equal(a.direction, b.direction)
    for (name, x), y in zip(method.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert name == "_extra_state" or torch.equal(x, y), name
    assert all(p.grad is None for p in method.parameters())


def test_great_discriminator_steps_are_torch_adam_steps():
    """D descends L_D by torch.optim.Adam (its fused kernel), state carried by GREAT's own buffers."""
    method = build("great", ABC, lr=1e-2)
    steps = separable_steps(3)
    method(steps[0])  # builds D and takes its first step
    names = ("hidden_weight", "hidden_bias", "out_weight", "out_bias")
    params = [getattr(method, n).detach().clone().requires_grad_() for n in names]
    optimizer = torch.optim.Adam(params, lr=1e-2, fused=True)
    for name, p in zip(names, params, strict=True):  # the state after GREAT's first step
        optimizer.state[p] = {"step": torch.tensor(1.0), "exp_avg": getattr(method, f"{name}_avg").clone(),
                              "exp_avg_sq": getattr(method, f"{name}_sq").clone()}
    for step in steps[1:]:
        optimizer.zero_grad()
        method.discriminator_loss(step, params).backward()
        optimizer.step()
        method(step)
    for name, p in zip(names, params, strict=True):
        torch.testing.assert_close(getattr(method, name), p.detach(), rtol=1e-6, atol=1e-7)
    assert int(method.count) == 3


def test_great_strength_zero_is_the_plain_sum():
    step = separable_steps(1)[0]
    torch.testing.assert_close(build("great", ABC, strength=0.0)(step).direction, step.jacobian.sum(dim=0))


# --- each call advances the state once -------------------------------------------------------------


@pytest.mark.parametrize("name", ["moco", "great"])
def test_each_call_is_one_step(name):
    """``method(step)`` is one step: the counter advances once per call, a second call with the same
    step's inputs advances again (there is no first-visit memo), and a fresh method given the same
    first step returns the same update."""
    once, twice = build(name, ABC), build(name, ABC)

    def step(k: int) -> Step:  # a fresh Step each call: its generator is consumed by the draws
        return make_step(name, jac(k, 3, 12), torch.ones(3, dtype=torch.float64), tasks=ABC, index=k)

    for k in range(3):
        first = once(step(k))
        twice(step(k))
        assert int(once.count) == k + 1
        assert int(twice.count) == 1 + 2 * k
        twice(step(k))
        assert int(twice.count) == 2 * (k + 1)
        if k == 0:
            again = build(name, ABC)(step(k))
            assert torch.equal(again.weights, first.weights) and torch.equal(again.direction, first.direction)
    differs = [not torch.equal(a, b) for (key, a), b in zip(once.state_dict().items(), twice.state_dict().values(),
                                                             strict=True) if key not in ("_extra_state", "count")]
    assert any(differs), f"{name}: calling twice per step left the same state as once"


# --- GradVac and Nash-MTL -----------------------------------------------------------------------


def test_gradvac_first_step_with_zero_targets_is_pcgrad_and_updates_targets():
    g = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.3]], dtype=torch.float64)
    method = build("gradvac", ("t0", "t1"), beta=0.25)
    torch.testing.assert_close(weights_of("gradvac", g, method=method), weights_of("pcgrad", g))
    cos = float(g[0] @ g[1] / (g[0].norm() * g[1].norm()))
    torch.testing.assert_close(method.targets, torch.tensor([[0.0, 0.25 * cos], [0.25 * cos, 0.0]],
                                                            dtype=torch.float64))


def test_nash_mtl_update_weights_every():
    j = jac(4, t=3, p=9)
    method = build("nash_mtl", ("t0", "t1", "t2"), max_norm=0.0, update_weights_every=3)
    first = weights_of("", j, method=method)
    for seed in (5, 6):  # calls 1 and 2 reuse the weights of call 0
        torch.testing.assert_close(weights_of("", jac(seed, t=3, p=9), method=method), first)
    j3 = jac(7, t=3, p=9)
    torch.testing.assert_close(weights_of("", j3, method=method), weights_of("nash_mtl", j3, max_norm=0.0))  # re-solved


# --- every stateful loss weighting: subsets and exact resume -------------------------------------------

LOSS_WEIGHTING = ["inverse_size", "uncertainty", "imtl_l", "dwa", "rlw", "gls", "stch", "gradnorm", "db_mtl",
                  "famo", "dtp", "warmup"]
PARAMS = {"warmup": {"inner": "famo", "steps": 3}}


@pytest.mark.parametrize("name", LOSS_WEIGHTING)
def test_subset_of_tasks_and_exact_resume(name):
    torch.manual_seed(0)
    j = torch.randn(3, 6, dtype=torch.float64)
    method = build(name, ABC, sizes={t: 10 for t in ABC}, **PARAMS.get(name, {}))

    def step(index: int, active) -> Step:
        rows = [ABC.index(t) for t in active]
        losses = (1.0 + 0.5 * torch.rand(len(rows), generator=torch.Generator().manual_seed(index),
                                         dtype=torch.float64)).tolist()
        return loss_step(losses, active, gramian=(j[rows] @ j[rows].T).tolist(), index=index, seed=index)

    for index, active in enumerate([ABC, ("c", "a"), ABC]):
        weights = method(step(index, active)).weights
        assert weights.shape == (len(active),) and bool(torch.isfinite(weights).all())
    method.on_epoch_end(0, {"a": 1.0, "b": 2.0, "c": 3.0}, {t: {"accuracy": 0.5} for t in ABC})
    other = build(name, ABC, sizes={t: 10 for t in ABC}, **PARAMS.get(name, {}))
    other.load_state_dict(method.state_dict())
    for index, active in enumerate([("b",), ABC], start=3):
        close(other(step(index, active)).weights, method(step(index, active)).weights)
