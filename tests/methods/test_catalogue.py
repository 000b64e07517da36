"""Issue 17's additions cross-checked against their peer implementations.

TorchJD 0.18 (installed with the test extra) is called directly: ExcessMTL, PCD, CR-MOGM, UPGrad's
options, the PBI / COSMOS / GeometricMean scalarisers. LibMTL and torch-rechub cannot be installed
beside this torch, so their loops (IMTL, MoCo's shared code, GradVac's group_type, MetaBalance,
ExcessMTL's first step) are re-derived here in a few lines from their source and compared.
"""

from __future__ import annotations

import pytest
import torch
import torchjd.aggregation as tja
import torchjd.scalarization as tjs
from torchjd.linalg import QuadprogProjector

import polytask as pt
from polytask.config.schema import load_config
from polytask.core.errors import InvalidParameterError
from polytask.engine import Engine
from polytask.methods import METHODS
from polytask.methods._groups import column_groups, layer_of
from polytask.methods.base import Step, stream

from .helpers import Tiny, build, flat_grad, jac, make_step, names, weights_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _steps(t: int = 3, p: int = 8, n: int = 4, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(t, p, generator=gen, dtype=torch.float64), torch.rand(t, generator=gen, dtype=torch.float64) + 0.2)
            for _ in range(n)]


# --- TorchJD -------------------------------------------------------------------------------------


def test_excess_mtl_ratios_match_torchjd_and_first_step_matches_libmtl():
    eta = 0.5
    ours, peer = build("excess_mtl", names(3), robust_step_size=eta), tja.ExcessMTLWeighting(robust_step_size=eta)
    previous = previous_peer = None
    for k, (j, losses) in enumerate(_steps()):
        w = ours(make_step(ours, j, losses, index=k)).weights
        lam = peer(j)
        if k == 0:  # LibMTL / the authors: the first step sets the baseline, weights stay 1
            torch.testing.assert_close(w, torch.ones(3, dtype=torch.float64), rtol=0, atol=0)
        else:  # both multiply by exp(η rᵢ) from the same excess risks: equal normalised ratios
            mine, theirs = w / previous, lam / previous_peer
            torch.testing.assert_close(mine / mine.sum(), theirs / theirs.sum(), rtol=1e-10, atol=0)
            assert abs(float(w.sum()) - 3) < 1e-12
        previous, previous_peer = w, lam


def test_excess_mtl_libmtl_loop():
    """LibMTL's ExcessMTL.backward, re-derived: S += g², w = gᵀ(g/√(S+1e-7)), ratio to the first w."""
    eta = 0.3
    method = build("excess_mtl", names(3), robust_step_size=eta)
    grad_sum, weight, initial = None, torch.ones(3, dtype=torch.float64), None
    for k, (j, losses) in enumerate(_steps(seed=4)):
        grad_sum = j**2 if grad_sum is None else grad_sum + j**2
        w = ((j / torch.sqrt(grad_sum + 1e-7)) * j).sum(dim=1)
        if initial is None:
            initial = w
        else:
            weight = weight * torch.exp(eta * w / initial)
            weight = weight / weight.sum() * 3
        got = method(make_step(method, j, losses, index=k)).weights
        torch.testing.assert_close(got, weight, rtol=1e-6, atol=0)  # ours divides by initial + 1e-7


@pytest.mark.parametrize("tau", [0.02, 0.3])
def test_pcd_matches_torchjd(tau):
    ours, peer = build("pcd", names(4), tau=tau, beta=0.9), tja.PCDWeighting(tau=tau, beta=0.9)
    gen = torch.Generator().manual_seed(1)
    for k in range(5):
        j = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        j[1] = -0.8 * j[0] + 0.3 * j[1]  # a secondary task in conflict with the primary
        step = make_step(ours, j, index=k)
        torch.testing.assert_close(ours(step).weights, peer(step.gramian), rtol=1e-7, atol=1e-9)


def test_pcd_primary_by_name_and_its_guarantee():
    j = torch.tensor([[1.0, 0.0, 0.0], [-0.9, 0.5, 0.0], [0.2, -1.0, 0.4]], dtype=torch.float64)
    method = build("pcd", names(3), primary="t1", tau=0.2)
    w = method(make_step(method, j)).weights
    d = w @ j
    torch.testing.assert_close(d.norm(), j[1].norm())  # rescaled to the primary's norm
    unit = j / j.norm(dim=1, keepdim=True)  # first step: v̂ᵢ = ‖gᵢ‖², so g̃ᵢ is (nearly) the unit gradient
    assert bool((unit[[0, 2]] @ d > 0).all()), unit @ d  # each secondary task gets progress (τ > 0)
    free = build("pcd", names(3), primary="t1", tau=0.0)
    assert float(free(make_step(free, j)).weights[1]) > 0
    with pytest.raises(InvalidParameterError, match="`primary` of `pcd` names unknown task 'x'"):
        build("pcd", names(3), primary="x")


def test_cr_mogm_matches_torchjd_around_upgrad():
    peer = tja.CRMOGMWeighting(tja.UPGradWeighting(projector=QuadprogProjector(norm_eps=0.0, reg_eps=0.0)), alpha=0.6)
    ours = build("cr_mogm", names(3), inner="upgrad", alpha=0.6)
    assert ours.needs == "gramian" and ours.compare == "shared"
    for k, (j, losses) in enumerate(_steps(p=6)):
        step = make_step(ours, j, losses, index=k)
        torch.testing.assert_close(ours(step).weights, peer(step.gramian), rtol=1e-6, atol=1e-9)


def test_cr_mogm_refuses_directions_and_learnable_weights():
    with pytest.raises(InvalidParameterError, match="returns an update direction"):
        METHODS.create("cr_mogm", inner="graddrop")
    with pytest.raises(InvalidParameterError, match="learns parameters"):
        METHODS.create("cr_mogm", inner="uncertainty")
    with pytest.raises(InvalidParameterError, match=r"`alpha` of `cr_mogm` must be in \[0, 1\]"):
        METHODS.create("cr_mogm", alpha=1.5)


def test_upgrad_preference_and_ridge_match_torchjd():
    u = {"t0": 2.0, "t1": 0.5, "t2": 1.0}
    for reg_eps in (0.0, 1e-4):
        peer = tja.UPGradWeighting(pref_vector=torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64) / 3,
                                   projector=QuadprogProjector(norm_eps=0.0, reg_eps=reg_eps))
        for j, _ in _steps(p=5):
            j[2] = -j[0] + 0.1 * j[2]
            got = weights_of("upgrad", j, preference=u, reg_eps=reg_eps)
            torch.testing.assert_close(got, peer(j @ j.T), rtol=1e-6, atol=1e-9)
    default = tja.UPGradWeighting()  # TorchJD's default ridge 1e-4 on the trace-normalised G
    j = jac(3, 3, 6)
    torch.testing.assert_close(weights_of("upgrad", j, reg_eps=1e-4), default(j @ j.T), rtol=1e-6, atol=1e-9)
    # the default stays the exact projection, bit for bit
    torch.testing.assert_close(weights_of("upgrad", j), weights_of("upgrad", j, preference={"t0": 1.0}), rtol=1e-12, atol=0)


def _autograd_weights(scalariser, losses: torch.Tensor) -> torch.Tensor:
    x = losses.clone().requires_grad_(True)
    return torch.autograd.grad(scalariser(x), x)[0]


def test_pbi_cosmos_and_geometric_mean_are_the_torchjd_scalarisers_gradients():
    losses = torch.tensor([0.4, 1.3, 0.7], dtype=torch.float64)
    pref = {"t0": 1.0, "t1": 2.0, "t2": 0.5}
    r = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    ref = torch.tensor([0.1, 0.0, 0.2], dtype=torch.float64)
    cases = [
        ("pbi", {"theta": 5.0, "preference": pref, "reference": {"t0": 0.1, "t2": 0.2}}, tjs.PBI(5.0, r, ref)),
        ("pbi", {}, tjs.PBI(5.0, torch.ones(3, dtype=torch.float64))),
        ("cosmos", {"penalty": 2.0, "preference": pref}, tjs.COSMOS(2.0, r)),
        ("gls", {}, tjs.GeometricMean()),
    ]
    for name, params, peer in cases:
        method = build(name, names(3), **params)
        got = method(make_step(method, torch.zeros(3, 1, dtype=torch.float64), losses)).weights
        torch.testing.assert_close(got, _autograd_weights(peer, losses), rtol=1e-9, atol=1e-12, msg=name)


def test_pbi_pulls_onto_the_preference_ray():
    """On the ray only d₁ counts (w = ŵ); a task above the ray gets more weight, the other less."""
    w = weights_of("pbi", torch.zeros(2, 1, dtype=torch.float64))  # losses 0.5, 1.5: t1 above the ray
    assert float(w[1]) > float(w[0])
    method = build("pbi", names(2))
    on_ray = method(Step(tasks=names(2), losses=torch.tensor([0.7, 0.7], dtype=torch.float64))).weights
    torch.testing.assert_close(on_ray, torch.full((2,), 2**-0.5, dtype=torch.float64))


# --- LibMTL and torch-rechub, re-derived ----------------------------------------------------------


def test_imtl_is_libmtl_imtl_on_the_scaled_losses():
    j, losses = _steps(p=7, n=1, seed=3)[0]
    method = build("imtl", names(3))
    s = torch.tensor([0.3, -0.2, 0.5])
    method.log_scales.data = s.clone()
    update = method(make_step(method, j, losses))
    grads = torch.exp(s.double())[:, None] * j  # LibMTL: gradients of e^s L − s
    unit = grads / grads.norm(dim=1, keepdim=True)
    dd, uu = grads[:1] - grads[1:], unit[:1] - unit[1:]
    alpha = grads[0] @ uu.T @ torch.linalg.inv(dd @ uu.T)
    alpha = torch.cat([1 - alpha.sum()[None], alpha])
    torch.testing.assert_close(update.weights, alpha * torch.exp(s.double()), rtol=1e-8, atol=1e-10)
    (grad,) = torch.autograd.grad(update.penalty, method.log_scales)
    torch.testing.assert_close(grad, (torch.exp(s) * losses.float() - 1), rtol=1e-6, atol=1e-6)  # IMTL-L's


def test_moco_authors_variant_is_libmtl_moco():
    beta, beta_sigma, gamma, gamma_sigma, rho = 0.5, 0.5, 0.1, 0.5, 0.05
    method = build("moco", names(3), beta=beta, beta_sigma=beta_sigma, gamma=gamma, gamma_sigma=gamma_sigma, rho=rho,
                   variant="authors")
    y, lam = torch.zeros(3, 8, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    for k, (j, losses) in enumerate(_steps(), start=1):
        g = j / (j.norm(dim=1, keepdim=True) + 1e-8) * losses[:, None]
        y = y - (beta / k**beta_sigma) * (y - g)
        lam = torch.softmax(lam - (gamma / k**gamma_sigma) * (y @ y.T + rho * torch.eye(3, dtype=torch.float64)) @ lam, -1)
        update = method(make_step(method, j, losses, index=k - 1))
        torch.testing.assert_close(update.weights, lam, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(update.direction, y.T @ lam, rtol=1e-10, atol=1e-12)
    with pytest.raises(InvalidParameterError, match="`variant` of `MoCo` must be one of paper, authors"):
        METHODS.create("moco", variant="libmtl")


def test_gradvac_groups_are_libmtl_group_types():
    """LibMTL's GradVac loop over (task i, shuffled j, group k), re-derived, against the engine's
    update on θ for ``group_type`` layer and matrix (the random orders come from stream(seed, index))."""
    for group_type in ("layer", "matrix"):
        model = Tiny(("t0", "t1", "t2"), seed=2)
        shared = model.shared()
        engine = Engine(METHODS.create("gradvac", group_type=group_type, beta=0.3), shared, seed=5)
        shapes = [p.shape for p in shared]
        sizes = [p.numel() for p in shared]
        bounds = [0]
        if group_type == "layer":  # Linear(5, 6), Linear(6, 4): weight and bias together
            assert layer_of(shapes) == [0, 0, 1, 1]
            bounds += [sizes[0] + sizes[1], sum(sizes)]
        else:
            for n in sizes:
                bounds.append(bounds[-1] + n)
        groups = list(zip(bounds[:-1], bounds[1:], strict=True))
        rho = torch.zeros(3, 3, len(groups), dtype=torch.float64)
        for index in range(3):
            _, losses = model.losses(seed=10 + index)
            jac_rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, shared, retain_graph=True)]).double()
                        for v in losses.values()]
            grads = torch.stack(jac_rows)
            pc = grads.clone()
            gen = stream(5, index)
            for i in range(3):
                others = [x for x in range(3) if x != i]
                for jj in [others[k] for k in torch.randperm(2, generator=gen).tolist()]:
                    for k, (b, e) in enumerate(groups):
                        r = pc[i, b:e] @ grads[jj, b:e] / (pc[i, b:e].norm() * grads[jj, b:e].norm() + 1e-8)
                        if r < rho[i, jj, k]:
                            t = rho[i, jj, k]
                            w = pc[i, b:e].norm() * (t * (1 - r**2).sqrt() - r * (1 - t**2).sqrt()) / (
                                grads[jj, b:e].norm() * (1 - t**2).sqrt() + 1e-8)
                            pc[i, b:e] += grads[jj, b:e] * w
                        rho[i, jj, k] = 0.7 * rho[i, jj, k] + 0.3 * r
            for p in shared:
                p.grad = None
            engine.backward(losses)
            torch.testing.assert_close(flat_grad(shared).double(), pc.sum(0), rtol=1e-4, atol=1e-6,
                                       msg=lambda m, g=group_type, i=index: f"{g} at step {i}: {m}")
        assert engine.method.group_targets.shape == (3, 3, len(groups))


def test_layers_from_shapes_keep_norm_layers_apart():
    shapes = [torch.Size(s) for s in [(6, 4), (6,), (6,), (6,), (3, 6, 3, 3), (3,), (5, 6), (5,), (7,)]]
    assert layer_of(shapes) == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert column_groups(shapes, sum(s.numel() for s in shapes), "layer")[1] == slice(30, 42)
    assert column_groups(None, 10, "matrix") == [slice(0, 10)]
    with pytest.raises(InvalidParameterError, match="`group_type` of `gradvac` must be one of whole, layer, matrix"):
        METHODS.create("gradvac", group_type=1)


def test_metabalance_is_torch_rechub_per_tensor_loop():
    relax, beta = 0.6, 0.8
    model = Tiny(("t0", "t1", "t2"), seed=4)
    shared = model.shared()
    engine = Engine(METHODS.create("metabalance", relax_factor=relax, beta=beta), shared)
    norms = [[0.0] * 3 for _ in shared]
    for index in range(3):
        _, losses = model.losses(seed=20 + index)
        total = []
        for k, p in enumerate(shared):
            summed = torch.zeros_like(p)
            for i, v in enumerate(losses.values()):  # torch-rechub: one backward per loss, per tensor
                g = torch.autograd.grad(v, p, retain_graph=True)[0]
                norms[k][i] = norms[k][i] * beta + (1 - beta) * float(g.norm())
                summed += g * norms[k][0] / (norms[k][i] + 1e-5) * relax + g * (1 - relax)
            total.append(summed.reshape(-1))
        for p in shared:
            p.grad = None
        report = engine.backward(losses)
        torch.testing.assert_close(flat_grad(shared), torch.cat(total), rtol=1e-5, atol=1e-7)
        assert report.weights == {"t0": 1.0, "t1": 1.0, "t2": 1.0}


# --- the options ---------------------------------------------------------------------------------


def test_cagrad_rescale_choices():
    j = jac(7, 3, 6)
    plain = weights_of("cagrad", j, c=0.5, rescale=0)
    torch.testing.assert_close(weights_of("cagrad", j, c=0.5, rescale=2), plain / 1.5, rtol=1e-12, atol=0)
    torch.testing.assert_close(weights_of("cagrad", j, c=0.5, rescale=1), weights_of("cagrad", j, c=0.5, rescale=True),
                               rtol=0, atol=0)
    torch.testing.assert_close(weights_of("cagrad", j, c=0.5, rescale=False), plain, rtol=0, atol=0)
    with pytest.raises(InvalidParameterError, match="`rescale` of `CAGrad` must be a bool or 0, 1, 2"):
        METHODS.create("cagrad", rescale=3)


def test_uncertainty_initial_log_variance():
    method = build("uncertainty", names(2), init_log_var=-0.5, forms={"t1": "classification"})
    w = method(Step(tasks=names(2), losses=torch.ones(2))).weights
    torch.testing.assert_close(w, torch.tensor([0.5, 1.0]) * torch.exp(torch.tensor(0.5)))  # LibMTL's 1/(2e^−0.5)
    with pytest.raises(InvalidParameterError, match="`init_log_var` of `uncertainty` must be a number in"):
        METHODS.create("uncertainty", init_log_var="low")


def test_db_mtl_beta_sigma_decays_the_average():
    beta, sigma = 0.9, 1.0
    method = build("db_mtl", names(2), beta=beta, beta_sigma=sigma)
    expected = None
    for k, (j, losses) in enumerate(_steps(t=2), start=1):
        method(make_step(method, j, losses, index=k - 1))
        current = j.norm(dim=1) / losses
        b = beta / k**sigma
        expected = current if expected is None else b * expected + (1 - b) * current
        torch.testing.assert_close(method.norms, expected, rtol=1e-12, atol=0)
    assert "counts" not in build("db_mtl", names(2)).state_dict()  # the default keeps its old state


@pytest.mark.parametrize(("name", "params", "message"), [
    ("excess_mtl", {"robust_step_size": 0}, "`robust_step_size` of `excess_mtl` must be > 0"),
    ("pcd", {"tau": 1.5}, r"`tau` of `pcd` must be a number in \[0, 1\]"),
    ("pcd", {"tau": {"t1": -1}}, r"`tau\['t1'\]` of `pcd` must be a number in \[0, 1\]"),
    ("pcd", {"beta": 1.0}, r"`beta` of `pcd` must be in \[0, 1\)"),
    ("pbi", {"theta": -1}, "`theta` of `pbi` must be >= 0"),
    ("pbi", {"preference": {"a": 0}}, r"`preference\['a'\]` of `pbi` must be a number > 0"),
    ("cosmos", {"penalty": -0.1}, "`penalty` of `cosmos` must be >= 0"),
    ("metabalance", {"relax_factor": 1.0}, r"`relax_factor` of `metabalance` must be in \[0, 1\)"),
    ("metabalance", {"group": "layer"}, "`group` of `metabalance` must be one of matrix, whole"),
    ("upgrad", {"reg_eps": -1e-4}, "`reg_eps` of `upgrad` must be >= 0"),
    ("upgrad", {"preference": {"a": -1}}, r"`preference\['a'\]` of `upgrad` must be a number >= 0"),
    ("db_mtl", {"beta_sigma": -1}, "`beta_sigma` of `db_mtl` must be >= 0"),
])
def test_bad_parameters_are_one_clear_error(name, params, message):
    with pytest.raises(InvalidParameterError, match=message):
        METHODS.create(name, **params)


def test_new_options_from_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data: {dataset: adult}\nmethod: {name: pcd, primary: income, tau: {marital: 0.1}, beta: 0.99}\n")
    cfg = load_config(path)
    method = METHODS.create(cfg.method.name, **cfg.method.params)
    assert (method.primary, method.tau, method.beta) == ("income", {"marital": 0.1}, 0.99)
    with pytest.raises(InvalidParameterError, match="names unknown task 'income'"):
        method.setup(("a", "b"))


def test_auto_lambda_hypergradient_is_autograd_through_the_sgd_step():
    """With SGD at the look-ahead rate α on θ, hₖ = ∂/∂λ Σ F(θₖ − αJₖᵀλ) on the next batch, exactly."""
    alpha = 0.05
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_(True)
    method = METHODS.create("auto_lambda", lookahead_lr=alpha, lr=1e-2, primary=["t0", "t2"])
    engine = Engine(method, [theta])
    batches = [(torch.randn(3, 4, 5, dtype=torch.float64, generator=gen), torch.randn(3, 4, dtype=torch.float64, generator=gen))
               for _ in range(3)]

    def losses(th, batch):
        a, b = batch
        return {f"t{i}": 0.5 * ((a[i] @ th - b[i]) ** 2).sum() for i in range(3)}

    lam = torch.full((3,), 0.1, dtype=torch.float64)
    before = theta.detach().clone()
    j = torch.stack([torch.autograd.grad(v, theta, retain_graph=True)[0] for v in losses(theta, batches[0]).values()])
    report = engine.backward(losses(theta, batches[0]))
    torch.testing.assert_close(torch.tensor(list(report.weights.values()), dtype=torch.float64), lam)  # no hypergradient yet
    with torch.no_grad():
        theta -= alpha * theta.grad  # SGD at rate α: θ₁ = θ₀ − αJ₀ᵀλ
    var = lam.clone().requires_grad_(True)
    outer = losses(before - alpha * j.T @ var, batches[1])
    (want,) = torch.autograd.grad(outer["t0"] + outer["t2"], var)
    theta.grad = None
    report = engine.backward(losses(theta, batches[1]))
    torch.testing.assert_close(method.hypergradient, want, rtol=1e-10, atol=1e-12)
    # one Adam step on λ: each weight moves by about lr against its hypergradient
    moved = torch.tensor(list(report.weights.values()), dtype=torch.float64) - lam
    torch.testing.assert_close(moved, -1e-2 * torch.sign(want), rtol=1e-4, atol=1e-8)
    with pytest.raises(InvalidParameterError, match="`primary` of `auto_lambda` must be a non-empty list"):
        METHODS.create("auto_lambda", primary="t0")


def test_auto_lambda_lookahead_is_autograd_through_the_virtual_step():
    """mode=lookahead: h = ∂/∂λ F(θ − αJᵀλ) on the outer batch, from the engine's Step.lookahead."""
    alpha = 0.1
    gen = torch.Generator().manual_seed(6)
    theta = torch.randn(5, dtype=torch.float64, generator=gen).requires_grad_(True)
    inner_batch, outer_batch = ((torch.randn(3, 4, 5, dtype=torch.float64, generator=gen),
                                 torch.randn(3, 4, dtype=torch.float64, generator=gen)) for _ in range(2))

    def losses(th, batch):
        a, b = batch
        return {f"t{i}": 0.5 * ((a[i] @ th - b[i]) ** 2).sum() for i in range(3)}

    method = METHODS.create("auto_lambda", mode="lookahead", lookahead_lr=alpha, lr=1e-2, primary=["t1"])
    engine = Engine(method, [theta])
    with pytest.raises(InvalidParameterError, match="evaluates an outer batch at displaced parameters: pass lookahead="):
        engine.backward(losses(theta, inner_batch))
    j = torch.stack([torch.autograd.grad(v, theta)[0] for v in losses(theta, inner_batch).values()])
    var = torch.full((3,), 0.1, dtype=torch.float64, requires_grad=True)
    (want,) = torch.autograd.grad(losses(theta.detach() - alpha * j.T @ var, outer_batch)["t1"], var)
    engine = Engine(METHODS.create("auto_lambda", mode="lookahead", lookahead_lr=alpha, lr=1e-2, primary=["t1"]), [theta])
    report = engine.backward(losses(theta, inner_batch), lookahead=lambda moved: losses(moved[id(theta)], outer_batch))
    torch.testing.assert_close(engine.method.hypergradient, want, rtol=1e-10, atol=1e-12)
    weights = torch.tensor(list(report.weights.values()), dtype=torch.float64)
    torch.testing.assert_close(weights, 0.1 - 1e-2 * torch.sign(want), rtol=1e-4, atol=1e-8)  # λ updated first
    torch.testing.assert_close(theta.grad, j.T @ weights)  # then θ's update on the inner batch


def test_auto_lambda_lookahead_trains_from_the_trainer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=gen)
    data = pt.data.MultiOutputDataset(x, {"a": x @ torch.linspace(-1, 1, 6), "b": (x[:, 0] > 0).float()})
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16]), tasks)
    trainer = pt.Trainer(model, tasks, method={"name": "auto_lambda", "mode": "lookahead", "primary": ["a"], "lr": 1e-2},
                         loop={"epochs": 3, "batch_size": 32}, optim={"lr": 1e-2}, run={"progress": False})
    assert trainer.engine.lookahead
    report = trainer.fit(data, data)
    lam = trainer.engine.method.lam
    assert bool((lam != 0.1).all())  # λ moved at every step's hypergradient
    first, last = ([r["value"] for r in report.history if r["task"] == "a" and r["split"] == "val" and r["metric"] == "loss"][i]
                   for i in (0, -1))
    assert last < 0.7 * first


def test_moml_hypergradients_are_autograd_through_the_virtual_step_and_mgda_combines_them():
    eta = 0.2
    gen = torch.Generator().manual_seed(8)
    theta = torch.randn(6, dtype=torch.float64, generator=gen).requires_grad_(True)
    inner_batch, outer_batch = ((torch.randn(3, 5, 6, dtype=torch.float64, generator=gen),
                                 torch.randn(3, 5, dtype=torch.float64, generator=gen)) for _ in range(2))

    def losses(th, batch):
        a, b = batch
        return {f"t{i}": 0.5 * ((a[i] @ th - b[i]) ** 2).sum() for i in range(3)}

    j = torch.stack([torch.autograd.grad(v, theta)[0] for v in losses(theta, inner_batch).values()])
    logits = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    outer = losses(theta.detach() - eta * j.T @ torch.softmax(logits, 0), outer_batch)
    h = torch.stack([torch.autograd.grad(outer[f"t{k}"], logits, retain_graph=True)[0] for k in range(3)])
    unit = h / h.norm(dim=1, keepdim=True)
    engine = Engine(METHODS.create("moml", inner_lr=eta, lr=1e-2), [theta])
    report = engine.backward(losses(theta, inner_batch), lookahead=lambda moved: losses(moved[id(theta)], outer_batch))
    d = engine.method.hypergradient
    # d = Σ solₖ uₖ with Σ solₖ = 1 (the rows span 2 dimensions: S has 1 in its null space) …
    system = torch.cat([unit.T, torch.ones(1, 3, dtype=torch.float64)])
    sol = torch.linalg.lstsq(system, torch.cat([d, torch.ones(1, dtype=torch.float64)])).solution
    torch.testing.assert_close(system @ sol, torch.cat([d, torch.ones(1, dtype=torch.float64)]), rtol=0, atol=1e-9)
    assert bool((sol >= -1e-9).all()), sol
    assert bool((unit @ d >= d @ d - 1e-9).all())  # … and its min-norm point (KKT)
    w = torch.tensor(list(report.weights.values()), dtype=torch.float64)
    torch.testing.assert_close(w, torch.softmax(-1e-2 * torch.sign(d), 0), rtol=1e-4, atol=1e-8)  # one Adam step
    with pytest.raises(InvalidParameterError, match="`lookahead` of `moml` must be a bool"):
        METHODS.create("moml", lookahead="yes")


def test_moml_trains_from_the_trainer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(192, 6, generator=gen)
    data = pt.data.MultiOutputDataset(x, {"a": x @ torch.linspace(-1, 1, 6), "b": (x[:, 0] > 0).float()})
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16]), tasks)
    trainer = pt.Trainer(model, tasks, method={"name": "moml", "inner_lr": 1e-2, "lr": 1e-2},
                         loop={"epochs": 3, "batch_size": 32}, optim={"lr": 1e-2}, run={"progress": False})
    report = trainer.fit(data, data)
    assert bool((trainer.engine.method.logits != 0).any())
    first, last = ([r["value"] for r in report.history if r["task"] == "a" and r["split"] == "val" and r["metric"] == "loss"][i]
                   for i in (0, -1))
    assert last < 0.8 * first
