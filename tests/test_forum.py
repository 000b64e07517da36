"""FORUM (Ye, Lin, Cao, Zhang & Tsang, ECAI 2024): the step against LibMTL's computation re-derived."""

from __future__ import annotations

import json

import cvxpy as cp  # LibMTL's solver; a test dependency (torchjd[nash-mtl])
import numpy as np
import pytest
import torch

import polytask as pt
from polytask.core.errors import InvalidParameterError
from polytask.engine import Engine
from polytask.methods import METHODS

T, P = 3, 6


def _batches(seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(T, 5, P, dtype=torch.float64, generator=gen),
             torch.randn(T, 5, dtype=torch.float64, generator=gen)) for _ in range(2)]


def _losses(theta, batch):
    a, b = batch
    return {f"t{i}": 0.5 * ((a[i] @ theta - b[i]) ** 2).mean() for i in range(T)}


def _vector(theta, batch):
    return torch.stack(list(_losses(theta, batch).values()))


def libmtl_forum_step(theta, alpha, lam_prev, epoch, inner_batch, outer_batch, *, phi, inner_lr, inner_steps):
    """LibMTL's ``bacth_forward_FORUM`` re-derived for a model whose parameters are all θ:
    gradients of Σ softmax(α)ᵢLᵢ in (α, θ), SGD on a copy of θ, normalised outer gradients, the
    cvxpy problem on the eigen square root of AAᵀ, the EMA of λ and g_final = Σλ̄ĝ + ν∇q."""
    a = alpha.clone().requires_grad_(True)
    th = theta.detach().clone().requires_grad_(True)
    f = (torch.softmax(a, 0) * _vector(th, inner_batch)).sum()
    g_f = torch.cat([g.reshape(-1) for g in torch.autograd.grad(f, [a, th])])
    copy = theta.detach().clone().requires_grad_(True)
    sgd = torch.optim.SGD([copy], lr=inner_lr)
    for _ in range(inner_steps):
        sgd.zero_grad()
        (torch.softmax(alpha, 0) * _vector(copy, inner_batch)).sum().backward()
        sgd.step()
    a2 = alpha.clone().requires_grad_(True)
    (g_hat,) = torch.autograd.grad((torch.softmax(a2, 0) * _vector(copy.detach(), inner_batch)).sum(), a2)
    g_q = g_f.clone()
    g_q[:T] -= g_hat
    th2 = theta.detach().clone().requires_grad_(True)
    outer = _vector(th2, outer_batch)
    g_out = torch.stack([torch.autograd.grad(outer[k], th2, retain_graph=True)[0] for k in range(T)])
    g_out = g_out / g_out.norm(dim=1, keepdim=True)
    g_out = torch.cat([torch.zeros(T, T, dtype=g_out.dtype), g_out], dim=1)
    qq = float(g_q.norm() ** 2 + 1e-8)
    pi = [phi - float(g_q @ g_out[k]) / qq for k in range(T)]
    mat = torch.cat([g_out, g_q[None]]).numpy()
    vals, vecs = np.linalg.eig(mat @ mat.T)
    root = (vecs @ np.diag(np.sqrt(np.maximum(vals, 0))) @ np.linalg.inv(vecs)).real
    x = cp.Variable(T + 1, nonneg=True)
    problem = cp.Problem(cp.Minimize(cp.quad_over_lin(root @ x, 1) - x[-1] * phi * qq),
                         [cp.sum(x[:-1]) == 1, x[-1] >= cp.sum([x[k] * pi[k] for k in range(T)]), x >= 0])
    problem.solve(solver=cp.CLARABEL)
    lam = lam_prev + (1 / (epoch + 1) ** 0.75) * (torch.from_numpy(x.value[:T]) - lam_prev)
    nu = max(float(lam @ torch.tensor(pi, dtype=torch.float64)), 0.0)
    final = (lam[:, None] * g_out).sum(0) + nu * g_q
    return final[:T], final[T:], lam, nu


def _closure(theta, inner_batch, outer_batch):
    def losses(moved, batch="outer"):
        return _losses(moved[id(theta)], outer_batch if batch == "outer" else inner_batch)
    return losses


def test_forum_step_is_libmtls_computation_on_a_model_of_shared_parameters_only():
    inner_batch, outer_batch = _batches(3)
    gen = torch.Generator().manual_seed(4)
    theta = torch.randn(P, dtype=torch.float64, generator=gen).requires_grad_(True)
    options = {"phi": 0.3, "inner_lr": 0.05, "inner_steps": 4}
    method = METHODS.create("forum", lr=1e-2, **options)
    engine = Engine(method, [theta])
    alpha, lam = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for epoch in (0, 1):  # epoch 0: λ̄ is the QP's λ; epoch 1: the EMA at rate 2^(−3/4)
        want_alpha, want_theta, lam, nu = libmtl_forum_step(theta, alpha, lam, epoch, inner_batch, outer_batch,
                                                             **options)
        assert nu > 0.01  # the constraint is active: α receives a gradient
        theta.grad = None
        report = engine.backward(_losses(theta, inner_batch), epoch=epoch,
                                 lookahead=_closure(theta, inner_batch, outer_batch))
        torch.testing.assert_close(method.lam, lam, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(float(method.multiplier), nu, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(theta.grad, want_theta, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(method.hypergradient, want_alpha, rtol=1e-4, atol=1e-7)
        w = torch.tensor(list(report.weights.values()), dtype=torch.float64)
        torch.testing.assert_close(w, torch.softmax(alpha, 0))  # the weights of the step's direction
        # one Adam step on α: about lr against the sign of its gradient at the first step
        if epoch == 0:
            torch.testing.assert_close(method.logits, alpha - 1e-2 * torch.sign(want_alpha), rtol=1e-4, atol=1e-8)
        alpha = method.logits.clone()
        with torch.no_grad():
            theta -= 0.1 * theta.grad


def test_without_an_outer_batch_it_linearises_the_inner_steps_on_the_step_s_own_gradients():
    gen = torch.Generator().manual_seed(1)
    j = torch.randn(T, P, dtype=torch.float64, generator=gen)
    losses = torch.rand(T, dtype=torch.float64, generator=gen) + 0.5
    method = METHODS.create("forum", lookahead=False, inner_steps=3, inner_lr=0.1, phi=0.2)
    step = pt.methods.Step(tasks=tuple(f"t{i}" for i in range(T)), losses=losses, gramian=j @ j.T, jacobian=j)
    update = method(step)
    w = torch.full((T,), 1 / T, dtype=torch.float64)
    q_theta = w @ j
    s = torch.diag(w) - torch.outer(w, w)
    q_alpha = s @ (3 * 0.1 * (j @ j.T) @ w)  # L(θ) − L(θᴷ) ≈ Kη G w
    unit = j / j.norm(dim=1, keepdim=True)
    qq = float(q_alpha @ q_alpha + q_theta @ q_theta)
    pi = 0.2 - unit @ q_theta / (qq + 1e-8)
    lam, nu = method.lam, float(method.multiplier)
    torch.testing.assert_close(torch.tensor(nu, dtype=torch.float64), torch.clamp(lam @ pi, min=0.0))
    torch.testing.assert_close(update.direction, lam @ unit + nu * q_theta)
    torch.testing.assert_close(lam.sum(), torch.tensor(1.0, dtype=torch.float64))  # epoch 0: λ̄ = λ, on the simplex
    # KKT of the QP: the constraint ⟨∇q, d⟩ ≥ φ‖∇q‖² holds at the solution
    d_q = float(lam @ (unit @ q_theta)) + nu * qq
    assert d_q >= 0.2 * qq - 1e-8


def test_forum_trains_from_the_trainer_with_inner_steps_on_the_first_half():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(192, 6, generator=gen)
    data = pt.data.MultiOutputDataset(x, {"a": x @ torch.linspace(-1, 1, 6), "b": (x[:, 0] > 0).float()})
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16]), tasks)
    # φ = 2: the constraint ⟨∇q, d⟩ ≥ φ‖∇q‖² binds (ν > 0), so α learns; at φ = 0.1 on this small
    # net ‖∇q‖ < 1 and the unit outer gradients already satisfy it (ν = 0, α stays, as in LibMTL)
    trainer = pt.Trainer(model, tasks, method={"name": "forum", "inner_steps": 2, "inner_lr": 0.05, "lr": 1e-2, "phi": 2.0},
                         loop={"epochs": 3, "batch_size": 32}, optim={"lr": 1e-2}, run={"progress": False})
    assert trainer.engine.lookahead
    report = trainer.fit(data, data)
    assert bool((trainer.engine.method.logits != 0).any())  # α moved
    first, last = ([r["value"] for r in report.history if r["task"] == "a" and r["split"] == "val" and r["metric"] == "loss"][i]
                   for i in (0, -1))
    assert last < 0.8 * first


def test_bad_options_and_a_closure_without_the_inner_batch_are_refused():
    for bad, match in (({"inner_steps": 0}, "`inner_steps` of `forum` must be an int >= 1; found 0"),
                       ({"inner_steps": 2.5}, "`inner_steps` of `forum` must be an int >= 1"),
                       ({"phi": -1}, "`phi` of `forum` must be > 0; found -1"),
                       ({"inner_lr": 0}, "`inner_lr` of `forum` must be > 0"),
                       ({"lookahead": "yes"}, "`lookahead` of `forum` must be a bool")):
        with pytest.raises(InvalidParameterError, match=match):
            METHODS.create("forum", **bad)
    inner_batch, outer_batch = _batches(0)
    theta = torch.zeros(P, dtype=torch.float64, requires_grad=True)
    engine = Engine(METHODS.create("forum"), [theta])
    with pytest.raises(InvalidParameterError, match="must accept batch='inner'"):
        engine.backward(_losses(theta, inner_batch), lookahead=lambda moved: _losses(moved[id(theta)], outer_batch))
    with pytest.raises(InvalidParameterError, match="needs the step's inner and outer batches"):
        METHODS.create("forum")(pt.methods.Step(tasks=("a",), losses=torch.ones(1), gramian=torch.eye(1),
                                                jacobian=torch.ones(1, 2)))


def test_forum_options_are_reachable_from_yaml_and_validated(tmp_path, capsys):
    from polytask.cli.main import main

    sets = ["train.epochs=1", "train.batch_size=256", "data.options={rows: 1000}", f"output_dir={tmp_path / 'run'}",
            "method={name: forum, inner_steps: 2, inner_lr: 0.05, phi: 0.5}"]
    assert main(["train", "examples/adult.yaml", "--quiet"] + [a for s in sets for a in ("--set", s)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == "forum"
    bad = sets[:-1] + ["method={name: forum, inner_steps: 0}"]
    assert main(["train", "examples/adult.yaml", "--quiet"] + [a for s in bad for a in ("--set", s)]) != 0
    assert "`inner_steps` of `forum` must be an int >= 1; found 0" in capsys.readouterr().err
