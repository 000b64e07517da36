"""Paper properties of the Gramian gradient methods, engine equivalence, and TorchJD cross-checks."""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
from torch import nn

from polytask.core.errors import InvalidParameterError
from polytask.engine import Engine, task_jacobian
from polytask.methods import METHODS, Method, Step

OURS = ("cagrad", "dualproj", "gradvac", "imtl_g", "mgda", "nash_mtl", "pcgrad", "upgrad")


def jac(seed: int, t: int = 4, p: int = 12) -> torch.Tensor:
    return torch.randn(t, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def weights(name: str, j: torch.Tensor, seed: int = 0, method: Method | None = None, **params) -> torch.Tensor:
    tasks = tuple(f"t{i}" for i in range(len(j)))
    if method is None:
        method = METHODS.create(name, **params)
        method.setup(tasks)
    step = Step(tasks=tasks, losses=torch.linspace(0.5, 1.5, len(j), dtype=j.dtype), gramian=j @ j.T,
                generator=torch.Generator().manual_seed(seed))
    return method.weights(step)


def brute_force_min_norm(g: torch.Tensor) -> torch.Tensor:
    """Exact min of wᵀGw on the simplex by enumerating faces (G positive definite)."""
    best, best_val = None, float("inf")
    for size in range(1, len(g) + 1):
        for face in itertools.combinations(range(len(g)), size):
            sub = g[list(face)][:, list(face)]
            x = torch.linalg.solve(sub, torch.ones(size, dtype=g.dtype))
            if (x >= 0).all():
                w = torch.zeros(len(g), dtype=g.dtype)
                w[list(face)] = x / x.sum()
                val = float(w @ g @ w)
                if val < best_val:
                    best, best_val = w, val
    return best


# --- paper properties -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_mgda_is_min_norm_point_of_convex_hull(seed):
    j = jac(seed, t=5, p=8)
    w = weights("mgda", j)
    assert (w >= 0).all() and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    expected = brute_force_min_norm(j @ j.T) @ j
    torch.testing.assert_close(w @ j, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("name,params", [("mgda", {}), ("mgda", {"normalization": "l2"}),
                                         ("mgda", {"normalization": "loss+"}), ("upgrad", {}), ("dualproj", {})])
@pytest.mark.parametrize("shape", [(3, 10), (5, 4), (8, 3)])
def test_update_does_not_conflict_with_any_task(name, params, shape):
    for seed in range(4):
        j = jac(seed, *shape)
        d = weights(name, j, **params) @ j
        assert (j @ d >= -1e-9 * j.norm() ** 2).all(), f"{name} conflicts: {j @ d}"


def test_mgda_rejects_unknown_normalization():
    with pytest.raises(InvalidParameterError, match="`normalization` of `MGDA`"):
        METHODS.create("mgda", normalization="l1")


def test_upgrad_weights_are_at_least_the_mean_and_exact_when_no_conflict():
    j = jac(1, t=4, p=12)
    assert (weights("upgrad", j) >= 0.25 - 1e-12).all()
    aligned = torch.abs(jac(2, t=3, p=6)) + 0.1  # positive entries: all pairwise inner products > 0
    torch.testing.assert_close(weights("upgrad", aligned), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(weights("dualproj", aligned), torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("rescale", [True, False])
def test_cagrad_with_c_zero_is_the_mean(rescale):
    j = jac(3)
    torch.testing.assert_close(weights("cagrad", j, c=0.0, rescale=rescale), torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 10), (4, 4), (6, 3)])
def test_cagrad_maximises_worst_improvement_in_the_ball(shape):
    c = 0.5
    for seed in range(3):
        j = jac(seed, *shape)
        d = weights("cagrad", j, c=c, rescale=False) @ j
        g0 = j.mean(dim=0)
        radius = c * g0.norm()
        assert (d - g0).norm() <= radius * (1 + 1e-8)
        gen = torch.Generator().manual_seed(seed)
        trials = torch.randn(2000, j.shape[1], generator=gen, dtype=j.dtype)
        trials = g0 + radius * torch.rand(2000, 1, generator=gen, dtype=j.dtype) * trials / trials.norm(dim=1, keepdim=True)
        assert (j @ d).min() >= (trials @ j.T).min(dim=1).values.max() - 1e-9


def test_pcgrad_two_conflicting_gradients_become_orthogonal():
    g = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.3]], dtype=torch.float64)
    assert float(g[0] @ g[1]) < 0
    w = weights("pcgrad", g)
    pc1 = g[0] + (w[1] - 1) * g[1]  # with T = 2: g₁ᴾᶜ = g₁ + (w₂ − 1) g₂ and vice versa
    pc2 = g[1] + (w[0] - 1) * g[0]
    assert abs(float(pc1 @ g[1])) < 1e-12 and abs(float(pc2 @ g[0])) < 1e-12
    torch.testing.assert_close(w @ g, pc1 + pc2)
    agree = torch.tensor([[1.0, 0.2], [0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(weights("pcgrad", agree), torch.ones(2, dtype=torch.float64))


def test_gradvac_first_step_with_zero_targets_is_pcgrad_and_updates_targets():
    g = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.3]], dtype=torch.float64)
    method = METHODS.create("gradvac", beta=0.25)
    method.setup(("t0", "t1"))
    torch.testing.assert_close(weights("gradvac", g, method=method), weights("pcgrad", g))
    cos = float(g[0] @ g[1] / (g[0].norm() * g[1].norm()))
    torch.testing.assert_close(method.targets, torch.tensor([[0.0, 0.25 * cos], [0.25 * cos, 0.0]],
                                                            dtype=torch.float64))
    with pytest.raises(InvalidParameterError, match="`beta` of `GradVac`"):
        METHODS.create("gradvac", beta=1.5)


@pytest.mark.parametrize("shape", [(2, 5), (4, 12), (6, 40)])
def test_nash_mtl_weights_solve_bargaining_equation(shape):
    for seed in range(3):
        j = jac(seed, *shape)
        g = j @ j.T
        w = weights("nash_mtl", j, max_norm=0.0)
        assert (w > 0).all()
        torch.testing.assert_close(g @ w, 1 / w, rtol=1e-7, atol=0)


def test_nash_mtl_max_norm_and_update_every():
    j = jac(4, t=3, p=9)
    d = weights("nash_mtl", j, max_norm=0.5) @ j
    torch.testing.assert_close(d.norm(), torch.tensor(0.5, dtype=j.dtype))  # ‖d‖ = √T > 0.5 is clipped
    method = METHODS.create("nash_mtl", max_norm=0.0, update_weights_every=3)
    method.setup(("t0", "t1", "t2"))
    first = weights("", j, method=method)
    for seed in (5, 6):  # calls 1 and 2 reuse the weights of call 0
        torch.testing.assert_close(weights("", jac(seed, t=3, p=9), method=method), first)
    j3 = jac(7, t=3, p=9)
    torch.testing.assert_close(weights("", j3, method=method), weights("nash_mtl", j3, max_norm=0.0))  # re-solved


@pytest.mark.parametrize("shape", [(3, 10), (5, 7)])
def test_imtl_g_equal_projections_on_unit_gradients(shape):
    j = jac(7, *shape)
    w = weights("imtl_g", j)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    proj = (j / j.norm(dim=1, keepdim=True)) @ (w @ j)
    torch.testing.assert_close(proj, proj.mean().expand_as(proj), rtol=1e-9, atol=1e-12)


# --- engine equivalence ---------------------------------------------------------------------


class Tiny(nn.Module):
    def __init__(self, tasks: int = 3) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(4, 1) for _ in range(tasks))

    def forward(self, x):
        z = self.encoder(x)
        return z, [head(z).squeeze(-1) for head in self.heads]


def tiny_losses(model: Tiny, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 5, generator=gen), torch.randn(3, 16, generator=gen)
    z, outs = model(x)
    return z, {f"t{i}": ((o - y[i]) ** 2).mean() for i, o in enumerate(outs)}


@pytest.mark.parametrize("name", [n for n in METHODS.names() if METHODS.get(n).needs in ("gramian", "features")])
def test_engine_applies_sum_of_weighted_task_gradients(name):
    torch.manual_seed(0)
    model = Tiny()
    shared = list(model.encoder.parameters())
    method = METHODS.create(name)
    method.setup(("t0", "t1", "t2"))
    mode = "features" if method.needs == "features" else "parameters"
    engine = Engine(method, shared, mode=mode, seed=0)
    _, losses = tiny_losses(model, 1)
    full = task_jacobian(list(losses.values()), list(model.parameters()))
    model.zero_grad()
    z, losses = tiny_losses(model, 1)
    w = engine.backward(losses, features=[z])
    w = torch.tensor([w[t] for t in losses])
    got = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(got, w @ full, rtol=1e-5, atol=1e-6)
    if method.needs == "gramian" and getattr(method, "permutation_equivariant", True):
        js = full[:, :sum(p.numel() for p in shared)]
        fresh = METHODS.create(name)
        fresh.setup(("t0", "t1", "t2"))
        step = Step(tasks=("t0", "t1", "t2"), losses=torch.stack(list(losses.values())).detach(),
                    gramian=js @ js.T, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(w, fresh.weights(step).float(), rtol=1e-4, atol=1e-5)


# --- TorchJD cross-check --------------------------------------------------------------------


def torchjd_aggregators():
    agg = pytest.importorskip("torchjd.aggregation")
    from torchjd.linalg import QuadprogProjector

    exact = QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)  # TorchJD's default adds 1e-4 to G/tr G
    return agg, exact


@pytest.mark.parametrize("shape", [(2, 6), (3, 10), (5, 20), (6, 4), (8, 3)])
def test_torchjd_projections_imtl_and_mgda(shape):
    agg, exact = torchjd_aggregators()
    for seed in range(3):
        j = jac(seed, *shape)
        scale = j.norm() / len(j) ** 0.5
        full_rank = shape[1] > shape[0]
        # With T > P the dual cone is often {0}: both sides then return ~0 up to their ridges.
        atol = (1e-8 if full_rank else 1e-6) * scale
        for name, ref in [("upgrad", agg.UPGrad(projector=exact)), ("dualproj", agg.DualProj(projector=exact)),
                          ("imtl_g", agg.IMTLG())]:
            torch.testing.assert_close(weights(name, j) @ j, ref(j), rtol=1e-7, atol=atol,
                                       msg=lambda m, n=name: f"{n}: {m}")
        # TorchJD's MGDA is Frank–Wolfe (Sener & Koltun's Alg. 2), which converges sublinearly:
        # ours is exact (see the brute-force test), so never longer and close to it.
        ours, theirs = weights("mgda", j) @ j, agg.MGDA(epsilon=1e-12, max_iters=1000)(j)
        assert ours.norm() <= theirs.norm() + 1e-10 * scale
        if full_rank:
            assert (ours - theirs).norm() <= 0.05 * theirs.norm()


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_torchjd_random_order_methods_match_draw_for_draw(name):
    agg, _ = torchjd_aggregators()
    for shape in [(2, 5), (4, 12), (6, 3)]:
        ref = agg.PCGrad() if name == "pcgrad" else agg.GradVac(beta=0.5)
        method = METHODS.create(name)
        method.setup(tuple(f"t{i}" for i in range(shape[0])))
        for step in range(3):  # GradVac is stateful: three steps in a row
            j = jac(10 * step + shape[0], *shape)
            torch.manual_seed(step)  # TorchJD draws from torch's global generator, ours from step.generator
            expected = ref(j)
            torch.testing.assert_close(weights(name, j, seed=step, method=method) @ j, expected, rtol=1e-10, atol=1e-12)


def test_torchjd_cagrad():
    agg, _ = torchjd_aggregators()
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    for shape, c in [((3, 10), 0.4), ((5, 20), 0.5), ((6, 4), 0.8)]:
        j = jac(shape[0], *shape)
        ours = weights("cagrad", j, c=c, rescale=False) @ j  # TorchJD does not rescale by 1 + c²
        theirs = agg.CAGrad(c=c, norm_eps=0.0)(j)
        # Clarabel stops at ~1e-8 duality gap: equal to ~1e-4, and ours is never worse.
        torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=1e-5 * j.norm())
        assert (j @ ours).min() >= (j @ theirs).min() - 1e-9
        torch.testing.assert_close(weights("cagrad", j, c=c) @ j, ours / (1 + c**2))


def test_torchjd_nash_mtl():
    agg, _ = torchjd_aggregators()
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    for seed, shape in enumerate([(2, 10), (3, 10), (4, 30)]):
        j = jac(seed, *shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy: "problem is not DPP"
            theirs = agg.NashMTL(n_tasks=shape[0], max_norm=0.0).weighting(j)
        torch.testing.assert_close(weights("nash_mtl", j, max_norm=0.0), theirs, rtol=1e-6, atol=0)
