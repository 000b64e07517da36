"""Properties specific to one method's paper, beyond the registry-wide ones of ``properties.CLAIMS``:
MGDA's exact min-norm point, CAGrad's ball, PCGrad's orthogonality, Nash-MTL's bargaining equation,
IMTL-G's equal projections, Aligned-MTL's balanced spectrum, ConFIG's equal cosines, FairGrad's
optimality condition, GradDrop's sign masks, the simplex projection."""

from __future__ import annotations

import itertools

import pytest
import torch

from polytask.methods import get_method
from polytask.methods._simplex import project_simplex
from polytask.methods.aligned_mtl import balance_transformation

from . import properties
from .helpers import build, direction, jac, make_step, weights_of

SHAPES = [(3, 20), (5, 40), (2, 7), (4, 3)]  # the last one is rank-deficient (T > P)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny tensors: one intra-op thread is faster on a shared machine."""


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


@pytest.mark.parametrize("seed", range(6))
def test_mgda_is_min_norm_point_of_convex_hull(seed):
    j = jac(seed, t=5, p=8)
    w = weights_of("mgda", j)
    assert (w >= 0).all() and torch.isclose(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    torch.testing.assert_close(w @ j, brute_force_min_norm(j @ j.T) @ j, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("normalization", ["l2", "loss+"])
def test_mgda_normalisations_do_not_conflict(normalization):
    """MGDA stays non-conflicting with the paper code's gradient normalisations (the shared check)."""
    properties.check_non_conflicting(lambda tasks: build("mgda", tasks, normalization=normalization))


def test_upgrad_weights_are_at_least_the_mean_and_exact_when_no_conflict():
    j = jac(1, t=4, p=12)
    assert (weights_of("upgrad", j) >= 0.25 - 1e-12).all()
    aligned = torch.abs(jac(2, t=3, p=6)) + 0.1  # positive entries: all pairwise inner products > 0
    torch.testing.assert_close(weights_of("upgrad", aligned), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(weights_of("dualproj", aligned), torch.full((3,), 1 / 3, dtype=torch.float64))


@pytest.mark.parametrize("rescale", [True, False])
def test_cagrad_with_c_zero_is_the_mean(rescale):
    torch.testing.assert_close(weights_of("cagrad", jac(3), c=0.0, rescale=rescale),
                               torch.full((4,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(3, 10), (4, 4), (6, 3)])
def test_cagrad_maximises_worst_improvement_in_the_ball(shape):
    c = 0.5
    for seed in range(3):
        j = jac(seed, *shape)
        d = weights_of("cagrad", j, c=c, rescale=False) @ j
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
    w = weights_of("pcgrad", g)
    pc1 = g[0] + (w[1] - 1) * g[1]  # with T = 2: g₁ᴾᶜ = g₁ + (w₂ − 1) g₂ and vice versa
    pc2 = g[1] + (w[0] - 1) * g[0]
    assert abs(float(pc1 @ g[1])) < 1e-12 and abs(float(pc2 @ g[0])) < 1e-12
    torch.testing.assert_close(w @ g, pc1 + pc2)
    agree = torch.tensor([[1.0, 0.2], [0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(weights_of("pcgrad", agree), torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(2, 5), (4, 12), (6, 40)])
def test_nash_mtl_weights_solve_bargaining_equation(shape):
    for seed in range(3):
        j = jac(seed, *shape)
        w = weights_of("nash_mtl", j, max_norm=0.0)
        assert (w > 0).all()
        torch.testing.assert_close(j @ j.T @ w, 1 / w, rtol=1e-7, atol=0)


def test_nash_mtl_max_norm_clips_the_update():
    j = jac(4, t=3, p=9)
    d = weights_of("nash_mtl", j, max_norm=0.5) @ j
    torch.testing.assert_close(d.norm(), torch.tensor(0.5, dtype=j.dtype))  # ‖d‖ = √T > 0.5 is clipped


@pytest.mark.parametrize("shape", [(3, 10), (5, 7)])
def test_imtl_g_equal_projections_on_unit_gradients(shape):
    j = jac(7, *shape)
    w = weights_of("imtl_g", j)
    torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=w.dtype))
    proj = (j / j.norm(dim=1, keepdim=True)) @ (w @ j)
    torch.testing.assert_close(proj, proj.mean().expand_as(proj), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t,p", SHAPES)
def test_aligned_mtl_aligned_system_has_equal_singular_values(t, p):
    j = jac(0, t, p)
    g = j @ j.T
    aligned = balance_transformation(g) @ j
    rank = int(torch.linalg.matrix_rank(j))
    sv = torch.linalg.svdvals(aligned)[:rank]
    smallest = torch.linalg.eigvalsh(g)[-rank:].min().sqrt()
    torch.testing.assert_close(sv, torch.full_like(sv, float(smallest)))
    d = weights_of("aligned_mtl", j) @ j
    if rank == t:  # the update has the same positive inner product λ_min with every aligned gradient
        torch.testing.assert_close(aligned @ d, torch.full((t,), float(smallest) ** 2, dtype=j.dtype))


@pytest.mark.parametrize("t,p", SHAPES[:3])
def test_config_has_equal_positive_cosine_with_every_gradient(t, p):
    j = jac(2, t, p) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.5], dtype=torch.float64)[:t, None]
    d = weights_of("config", j) @ j
    cos = (j @ d) / (j.norm(dim=1) * d.norm())
    assert bool((cos > 0).all())
    torch.testing.assert_close(cos, torch.full_like(cos, float(cos[0])))
    torch.testing.assert_close(d.norm(), (j @ (d / d.norm())).sum())  # length = sum of projections


def test_config_ignores_zero_gradients():
    j = jac(0, 3, 10)
    j[1] = 0
    w = weights_of("config", j)
    assert w[1] == 0 and bool(torch.isfinite(w).all())


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("t,p", SHAPES)
def test_fairgrad_solves_its_optimality_condition(alpha, t, p):
    j = jac(4, t, p)
    w = weights_of("fairgrad", j, alpha=alpha)
    assert bool((w > 0).all())
    torch.testing.assert_close(j @ j.T @ w, w ** (-1 / alpha), rtol=1e-9, atol=1e-9)


def test_fairgrad_alpha_one_is_nash_mtl():
    j = jac(5, 4, 30)
    w = weights_of("fairgrad", j, alpha=1.0)
    torch.testing.assert_close(j @ j.T @ w, 1 / w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w @ j @ j.T @ w, torch.tensor(4.0, dtype=w.dtype))  # ‖d‖² = T, as in Nash-MTL
    torch.testing.assert_close(weights_of("nash_mtl", j, max_norm=0.0), w, rtol=1e-6, atol=1e-6)


def test_graddrop_keeps_one_sign_per_coordinate():
    j = jac(6, 3, 500)
    method = get_method("graddrop")
    update = method(make_step(method, j))
    d = update.direction
    positive, negative = j.clamp(min=0).sum(dim=0), j.clamp(max=0).sum(dim=0)
    # the positive sum exactly; the negative one to round-off (taken as Σᵢgᵢ − the positive sum)
    kept_positive, kept_negative = d == positive, torch.isclose(d, negative, rtol=0, atol=1e-12)
    assert bool((kept_positive | kept_negative).all())
    assert bool(kept_positive.any()) and bool(kept_negative.any())
    assert torch.equal(update.weights, torch.ones(3, dtype=j.dtype))  # the heads get their own gradients


def test_graddrop_leak_one_is_the_sum():
    j = jac(7, 3, 200)
    method = get_method("graddrop", leak=1.0)
    torch.testing.assert_close(direction(method(make_step(method, j)), j), j.sum(dim=0))


def test_project_simplex():
    v = torch.tensor([0.5, 2.0, -1.0, 0.3], dtype=torch.float64)
    x = project_simplex(v)
    assert bool((x >= 0).all()) and abs(float(x.sum()) - 1) < 1e-12
    torch.testing.assert_close(project_simplex(x), x)
    tau = (v - x)[x > 0]  # KKT: x = max(v − τ, 0) for one τ
    torch.testing.assert_close(tau, torch.full_like(tau, float(tau[0])))
