"""Golden values: our methods against TorchJD's implementations of the same methods (draw for draw
where they are random) and against the papers' formulas computed by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from polytask.methods import Step, get_method
from polytask.methods.gradnorm import gradnorm_targets

from .helpers import build, direction, jac, make_step, weights_of


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny tensors: one intra-op thread is faster on a shared machine."""


def torchjd():
    agg = pytest.importorskip("torchjd.aggregation")
    from torchjd.linalg import QuadprogProjector

    exact = QuadprogProjector(norm_eps=0.0, reg_eps=1e-12)  # TorchJD's default adds 1e-4 to G/tr G
    return agg, exact


SHAPES = [(3, 20), (5, 40), (2, 7), (4, 3)]  # the last one is rank-deficient (T > P)


# --- TorchJD: Gramian methods ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 6), (3, 10), (5, 20), (6, 4), (8, 3)])
def test_torchjd_projections_imtl_and_mgda(shape):
    agg, exact = torchjd()
    for seed in range(3):
        j = jac(seed, *shape)
        scale = j.norm() / len(j) ** 0.5
        full_rank = shape[1] > shape[0]
        # With T > P the dual cone is often {0}: both sides then return ~0 up to their ridges.
        atol = (1e-8 if full_rank else 1e-6) * scale
        for name, ref in [("upgrad", agg.UPGrad(projector=exact)), ("dualproj", agg.DualProj(projector=exact)),
                          ("imtl_g", agg.IMTLG())]:
            torch.testing.assert_close(weights_of(name, j) @ j, ref(j), rtol=1e-7, atol=atol,
                                       msg=lambda m, n=name: f"{n}: {m}")
        # TorchJD's MGDA is Frank–Wolfe (Sener & Koltun's Alg. 2), which converges sublinearly:
        # ours is exact (see the brute-force test), so never longer and close to it.
        ours, theirs = weights_of("mgda", j) @ j, agg.MGDA(epsilon=1e-12, max_iters=1000)(j)
        assert ours.norm() <= theirs.norm() + 1e-10 * scale
        if full_rank:
            assert (ours - theirs).norm() <= 0.05 * theirs.norm()


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_torchjd_random_order_methods_match_draw_for_draw(name):
    agg, _ = torchjd()
    for shape in [(2, 5), (4, 12), (6, 3)]:
        ref = agg.PCGrad() if name == "pcgrad" else agg.GradVac(beta=0.5)
        method = build(name, [f"t{i}" for i in range(shape[0])])
        for step in range(3):  # GradVac is stateful: three steps in a row
            j = jac(10 * step + shape[0], *shape)
            torch.manual_seed(step)  # TorchJD draws from torch's global generator, ours from step.generator
            expected = ref(j)
            got = weights_of(name, j, method=method, index=step, generator=torch.Generator().manual_seed(step)) @ j
            torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_torchjd_cagrad():
    agg, _ = torchjd()
    pytest.importorskip("cvxpy")
    pytest.importorskip("clarabel")
    for shape, c in [((3, 10), 0.4), ((5, 20), 0.5), ((6, 4), 0.8)]:
        j = jac(shape[0], *shape)
        ours = weights_of("cagrad", j, c=c, rescale=False) @ j  # TorchJD does not rescale by 1 + c²
        theirs = agg.CAGrad(c=c, norm_eps=0.0)(j)
        # Clarabel stops at ~1e-8 duality gap: equal to ~1e-4, and ours is never worse.
        torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=1e-5 * j.norm())
        assert (j @ ours).min() >= (j @ theirs).min() - 1e-9
        torch.testing.assert_close(weights_of("cagrad", j, c=c) @ j, ours / (1 + c**2))


def test_torchjd_nash_mtl():
    agg, _ = torchjd()
    pytest.importorskip("cvxpy")
    pytest.importorskip("ecos")
    for seed, shape in enumerate([(2, 10), (3, 10), (4, 30)]):
        j = jac(seed, *shape)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy: "problem is not DPP"
            theirs = agg.NashMTL(n_tasks=shape[0], max_norm=0.0).weighting(j)
        torch.testing.assert_close(weights_of("nash_mtl", j, max_norm=0.0), theirs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("t,p", SHAPES)
@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_torchjd_aligned_mtl(t, p, scale):
    agg, _ = torchjd()
    j = jac(1, t, p)
    ours = weights_of("aligned_mtl", j, scale=scale) @ j
    ref = agg.AlignedMTL(pref_vector=torch.ones(t, dtype=j.dtype), scale_mode=scale)(j)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("t,p", SHAPES)
def test_torchjd_config(t, p):
    agg, _ = torchjd()
    j = jac(3, t, p)
    torch.testing.assert_close(weights_of("config", j) @ j, agg.ConFIG()(j), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("t,p", SHAPES)
def test_torchjd_fairgrad(alpha, t, p):
    agg, _ = torchjd()
    j = jac(4, t, p)
    torch.testing.assert_close(weights_of("fairgrad", j, alpha=alpha) @ j, agg.FairGrad(alpha=alpha)(j),
                               rtol=1e-6, atol=1e-6)


def test_torchjd_graddrop_with_the_same_random_stream():
    agg, _ = torchjd()
    j = jac(8, 3, 300)
    for leak in (0.0, 0.3):
        method = get_method("graddrop", leak=leak)
        ours = direction(method(make_step(method, j, generator=torch.Generator().manual_seed(11))), j)
        torch.manual_seed(11)
        ref = agg.GradDrop(leak=torch.full((3,), leak, dtype=j.dtype))(j)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


# --- the papers' formulas by hand (loss weighting) ------------------------------------------------

AB = ("a", "b")


def loss_step(losses, tasks=AB, *, gramian=None, index=0, seed=0) -> Step:
    return Step(tasks=tuple(tasks), losses=torch.tensor(losses, dtype=torch.float64), index=index, seed=seed,
                gramian=None if gramian is None else torch.tensor(gramian, dtype=torch.float64))


def close(actual, expected, tol=1e-6) -> None:
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), atol=tol, rtol=tol)


def test_inverse_size_on_sizes_100_1000_10000():
    method = get_method("inverse_size")
    method.setup(["a", "b", "c"], sizes={"a": 100, "b": 1000, "c": 10000})
    close(method(loss_step([1.0, 1.0, 1.0], ("a", "b", "c"))).weights, [300 / 111, 30 / 111, 3 / 111])
    close(method(loss_step([1.0, 1.0], ("c", "a"))).weights, [3 / 111, 300 / 111])  # by name, not position
    root = get_method("inverse_size", alpha=0.5)
    root.setup(["a", "b"], sizes={"a": 100, "b": 10000})
    close(root(loss_step([1.0, 1.0])).weights, [2 * 0.1 / 0.11, 2 * 0.01 / 0.11])


def test_uncertainty_loss_matches_kendall():
    method = build("uncertainty", AB, forms={"b": "classification"})
    with torch.no_grad():
        method.log_vars.copy_(torch.tensor([0.5, -1.0]))  # s = log σ²
    losses = torch.tensor([2.0, 3.0], dtype=torch.float64, requires_grad=True)
    update = method(loss_step([2.0, 3.0]))
    total = (update.weights * losses).sum() + update.penalty
    sigma2 = torch.tensor([math.exp(0.5), math.exp(-1.0)])
    expected = 2.0 / (2 * sigma2[0]) + math.log(sigma2[0].sqrt()) + 3.0 / sigma2[1] + math.log(sigma2[1].sqrt())
    close(total, expected)
    total.backward()
    close(method.log_vars.grad, [-0.5 * math.exp(-0.5) * 2.0 + 0.5, -math.exp(1.0) * 3.0 + 0.5])


def test_imtl_l_loss():
    method = build("imtl_l", AB)
    with torch.no_grad():
        method.log_scales.copy_(torch.tensor([0.3, -0.2]))
    losses = torch.tensor([2.0, 5.0], dtype=torch.float64)
    update = method(loss_step(losses.tolist()))
    close((update.weights * losses).sum() + update.penalty, math.exp(0.3) * 2 - 0.3 + math.exp(-0.2) * 5 + 0.2)


def test_gradnorm_targets():
    norms, w = torch.tensor([1.0, 2.0]), torch.ones(2)
    losses, initial = torch.tensor([0.5, 1.0]), torch.ones(2)
    # L̃ = (0.5, 1), r = L̃ / 0.75 = (2/3, 4/3), Ḡ = 1.5
    close(gradnorm_targets(norms, w, losses, initial, 1.0), [1.0, 2.0])
    close(gradnorm_targets(norms, w, losses, initial, 2.0), [1.5 * 4 / 9, 1.5 * 16 / 9])
    close(gradnorm_targets(norms, w, losses, initial, 0.0), [1.5, 1.5])


def test_rlw_is_scaled_softmax_of_seeded_normals():
    """w = T softmax(z), z ~ N(0, I) drawn per task of setup() from the step's generator."""
    method = build("rlw", ("a", "b", "c"))

    def at(losses, tasks):
        return method(Step(tasks=tasks, losses=torch.tensor(losses, dtype=torch.float64),
                           generator=torch.Generator().manual_seed(7))).weights

    w = at([1.0, 2.0, 3.0], ("a", "b", "c"))
    z = torch.randn(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    close(w, 3 * torch.softmax(z, 0))
    close(at([1.0, 2.0, 3.0], ("c", "a", "b")), w[[2, 0, 1]])
    close(at([1.0, 2.0], ("a", "c")), 2 * torch.softmax(z[[0, 2]], 0))


def test_stch_weights_are_softmax():
    method = build("stch", AB, mu=0.5)
    close(method(loss_step([1.0, 2.0])).weights, torch.softmax(torch.tensor([2.0, 4.0]), 0))
    # Σ wᵢ ∇Lᵢ = ∇ μ log Σ exp(Lᵢ/μ)
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(0.5 * torch.logsumexp(losses / 0.5, 0), losses)
    close(method(loss_step([1.0, 2.0])).weights, grad)


def test_db_mtl_matches_paper_update_without_averaging():
    torch.manual_seed(1)
    j = torch.randn(3, 5, dtype=torch.float64)
    losses = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    method = build("db_mtl", ("a", "b", "c"), beta=0.0)
    w = method(loss_step(losses.tolist(), ("a", "b", "c"), gramian=(j @ j.T).tolist())).weights
    log_grads = j / losses[:, None]  # ∇ log Lᵢ
    norms = log_grads.norm(dim=1)
    close(w @ j, norms.max() * (log_grads / norms[:, None]).sum(0))
