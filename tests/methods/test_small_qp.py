"""The plain-Python active-set solver for few-task QPs agrees with quadprog, or says it cannot.

Each problem is min ½xᵀHx + qᵀx over x ≥ 0 (and Σx = 1): random Gramians of T = 1..8 gradients
in dimensions above and below T, some with an exact zero or duplicate gradient, solved here and by
quadprog (Goldfarb–Idnani); where this solver answers, its answer satisfies the KKT conditions and
has quadprog's objective value; where the face systems are singular it answers None.
"""

from __future__ import annotations

import numpy as np
import pytest
import quadprog
import torch
from torch import Tensor

from polytask.methods import _small_qp
from polytask.methods.base import Step, get_method


def _gramian(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    j = rng.normal(size=(n, dim)) * rng.uniform(0.1, 10.0, size=(n, 1))
    return j @ j.T


def _quadprog(h: np.ndarray, q: np.ndarray, simplex: bool) -> np.ndarray:
    n = len(h)
    c = np.eye(n)
    b = np.zeros(n)
    if simplex:
        c, b = np.concatenate([np.ones((n, 1)), c], axis=1), np.concatenate([[1.0], b])
    return quadprog.solve_qp(h + 1e-12 * np.trace(h) / n * np.eye(n), -q, c, b, 1 if simplex else 0)[0]


def _objective(h: np.ndarray, q: np.ndarray, x: np.ndarray) -> float:
    return float(0.5 * x @ h @ x + q @ x)


def _check_kkt(h: np.ndarray, q: np.ndarray, x: np.ndarray, simplex: bool) -> None:
    scale = np.trace(h) / len(h)
    assert (x >= 0).all()
    grad = h @ x + q
    if simplex:
        assert abs(x.sum() - 1) < 1e-12
        nu = grad[x > 0].mean()
    else:
        nu = 0.0
    # stationarity on the support, non-negative multipliers off it
    np.testing.assert_allclose(grad[x > 0], nu, atol=1e-9 * scale * max(1.0, np.abs(x).max()))
    assert (grad[x == 0] - nu >= -1e-9 * scale * max(1.0, np.abs(x).max())).all()


@pytest.mark.parametrize("simplex", [True, False], ids=["simplex", "nonneg"])
@pytest.mark.parametrize("n", range(1, _small_qp.SMALL_T + 1))
def test_agrees_with_quadprog_on_full_rank_gramians(n, simplex):
    rng = np.random.default_rng(n * 7 + simplex)
    for trial in range(40):
        h = _gramian(rng, n, n + 3 + trial % 5)
        # the dual-cone QP of UPGrad: q = G uᵢ eᵢ; a mix of signs, so some bounds are active
        q = np.zeros(n) if simplex else h[:, trial % n] * rng.uniform(0.2, 3.0) - rng.uniform(0, 1) * np.diag(h)
        got = _small_qp.nonneg_qp(_small_qp.symmetrised(h.tolist()), q.tolist(), simplex=simplex)
        assert got is not None, (n, trial)
        x = np.array(got)
        _check_kkt(h, q, x, simplex)
        ref = _quadprog(h, q, simplex)
        scale = np.trace(h) / n
        assert _objective(h, q, x) <= _objective(h, q, ref) + 1e-10 * scale * max(1.0, np.abs(ref).max()) ** 2
        np.testing.assert_allclose(x, ref, rtol=1e-6, atol=1e-7 * max(1.0, np.abs(ref).max()))


@pytest.mark.parametrize("simplex", [True, False], ids=["simplex", "nonneg"])
def test_singular_gramians_are_solved_or_handed_back(simplex):
    """Fewer dimensions than tasks, a zero gradient, a duplicated one: each answer is a KKT point,
    which for a convex QP is a global minimiser (quadprog itself, ridged, can leave the feasible set
    by 1e-5 here, so it is no reference); a face on which H is singular makes the solver answer None."""
    rng = np.random.default_rng(11)
    answered = handed_back = 0
    for trial in range(200):
        n = 2 + trial % 7
        j = rng.normal(size=(n, 1 + trial % 3))
        if trial % 4 == 1:
            j[trial % n] = 0.0
        if trial % 4 == 2:
            j[-1] = j[0]
        h = j @ j.T
        q = np.zeros(n) if simplex else h[:, trial % n] * 1.5 - 0.3 * np.diag(h)
        got = _small_qp.nonneg_qp(h.tolist(), q.tolist(), simplex=simplex)
        if got is None:
            handed_back += 1
            continue
        answered += 1
        x = np.array(got)
        _check_kkt(h, q, x, simplex)
    assert answered and handed_back  # both branches are exercised by these problems


def test_zero_and_non_finite_problems_are_handed_back():
    assert _small_qp.nonneg_qp([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0], simplex=True) is None
    assert _small_qp.nonneg_qp([[float("nan"), 0.0], [0.0, 1.0]], [0.0, 0.0]) is None
    assert _small_qp.nonneg_qp([], []) == []


def test_cholesky_solve_matches_numpy():
    rng = np.random.default_rng(3)
    h = _gramian(rng, 6, 9)
    index = [4, 0, 2, 5]
    b = rng.normal(size=(2, 4))
    got = _small_qp.cholesky_solve(h.tolist(), index, b.tolist(), 1e-10)
    assert got is not None
    np.testing.assert_allclose(np.array(got), np.linalg.solve(h[np.ix_(index, index)], b.T).T, rtol=1e-10)
    # a singular block is refused
    h[:, 2] = h[:, 0]
    h[2, :] = h[0, :]
    assert _small_qp.cholesky_solve(h.tolist(), [0, 2], [[1.0, 1.0]], 1e-10 * np.trace(h) / 6) is None


@pytest.mark.parametrize("index", [[3], [1, 4], [5, 0], [2, 5, 1], [4, 0, 2, 5], [0, 1, 2, 3, 4]])
def test_cholesky_solve_of_any_face_matches_numpy(index):
    """Faces of one, two or four tasks take an unrolled solve, the others the loops: the same
    answers, and the same refusals of a singular block."""
    rng = np.random.default_rng(len(index))
    h = _gramian(rng, 6, 9)
    b = rng.normal(size=(3, len(index)))
    got = _small_qp.cholesky_solve(h.tolist(), index, b.tolist(), 1e-10)
    assert got is not None
    np.testing.assert_allclose(np.array(got), np.linalg.solve(h[np.ix_(index, index)], b.T).T, rtol=1e-10)
    h[index[-1], index[-1]] = h[index[0], index[-1]] ** 2 / h[index[0], index[0]] if len(index) == 2 else 0.0
    assert _small_qp.cholesky_solve(h.tolist(), index, b.tolist(), 1e-10) is None  # a singular block


def _on_both_paths(name, options, gramians, monkeypatch):
    """Each Gramian's weights from method ``name`` on the few-task path and on the general path
    (forced by SMALL_T = 0), a fresh method per Gramian."""
    def run(small_t):
        monkeypatch.setattr(_small_qp, "SMALL_T", small_t)
        out = []
        for g in gramians:
            tasks = tuple(f"t{i}" for i in range(len(g)))
            method = get_method(name, **options)
            method.setup(tasks)
            out.append(method.weights(Step(tasks=tasks, losses=torch.ones(len(tasks), dtype=g.dtype), gramian=g)))
        return out

    return run(_small_qp.SMALL_T), run(0)


OPTIONS = {"mgda": [{}], "pcgrad": [{}], "upgrad": [{}, {"preference": {"t0": 0.0, "t1": 2.5}}, {"reg_eps": 1e-4}],
           "cagrad": [{}, {"c": 0.9, "rescale": 2}, {"c": 0.0}], "nash_mtl": [{}, {"max_norm": 0.0}]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("name", "options"), [(name, o) for name, opts in OPTIONS.items() for o in opts],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)) or "defaults")
def test_methods_give_the_quadprog_paths_weights(name, dtype, options, monkeypatch):
    """MGDA, UPGrad, CAGrad and Nash-MTL on the few-task path give the weights of their numpy/quadprog path
    (forced by SMALL_T = 0), on random Gramians of 2–8 tasks, conflicting or not, float64, float32 and bfloat16."""
    rng = np.random.default_rng(5)
    gramians = []
    for trial in range(30):
        n = 2 + trial % 7
        j = rng.normal(size=(n, 3 * n)) + (trial % 3) * rng.normal(size=(1, 3 * n))  # some share a direction
        gramians.append(torch.from_numpy(j @ j.T).to(dtype))
    fast, general = _on_both_paths(name, options, gramians, monkeypatch)
    for g, a, b in zip(gramians, fast, general, strict=True):
        assert a.dtype == g.dtype and a.shape == b.shape
        # bfloat16: both paths read the same rounded G (possibly slightly indefinite) and round
        # their float64 answers to bfloat16 (8 bits of mantissa)
        tol = {torch.float64: 1e-6, torch.float32: 2e-5, torch.bfloat16: 1.6e-2}[dtype]
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_nash_small_path_hands_singular_gramians_to_numpy():
    """Opposed gradients (Pareto-stationary, G singular) and a rank-deficient G are not decided on
    Python floats: the numpy path decides them (no weights: the previous ones are kept)."""
    from polytask.methods.nash_mtl import STATIONARY_POINT, solve_nash_small

    assert solve_nash_small([[1.0, -1.0], [-1.0, 1.0]]) is None
    assert solve_nash_small([[1.0, 1.0], [1.0, 1.0]]) is None
    w = solve_nash_small([[2.0, 0.5], [0.5, 1.0]])
    assert w is not None and w is not STATIONARY_POINT
    g = np.array([[2.0, 0.5], [0.5, 1.0]])
    np.testing.assert_allclose(g @ np.array(w), 1 / np.array(w), rtol=1e-9)


@pytest.mark.parametrize("options", [{}, {"update_weights_every": 2}, {"max_norm": 0.5}], ids=["default", "every2", "clip"])
def test_nash_small_path_keeps_the_general_paths_state(options, monkeypatch):
    """Over a run of steps (some with a task missing, which the general path takes) the few-task path
    gives the general path's weights and leaves the same buffers (a checkpoint is the same)."""
    rng = np.random.default_rng(9)
    tasks = ("a", "b", "c")
    steps = []
    for k in range(8):
        active = tasks if k % 3 != 2 else ("a", "c")
        j = rng.normal(size=(len(active), 7))
        steps.append((active, torch.from_numpy(j @ j.T)))

    def run(small_t):
        monkeypatch.setattr(_small_qp, "SMALL_T", small_t)
        method = get_method("nash_mtl", **options)
        method.setup(tasks)
        out = [method.weights(Step(tasks=active, losses=torch.ones(len(active)), gramian=g)) for active, g in steps]
        return out, method.state_dict()

    (fast, fast_state), (general, general_state) = run(_small_qp.SMALL_T), run(0)
    for a, b in zip(fast, general, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert fast_state.keys() == general_state.keys()
    for key, value in fast_state.items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(value, general_state[key], rtol=1e-9, atol=1e-12)
        else:
            assert value == general_state[key], key


@pytest.mark.parametrize(("name", "options"), [(name, o) for name, opts in OPTIONS.items() for o in opts],
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)) or "defaults")
def test_rank_deficient_gramians_give_the_general_paths_direction(name, options, monkeypatch):
    """Fewer parameters than tasks (G singular): the weights need not be unique, the direction
    d = Jᵀw is; the few-task path solves what it can vouch for and hands the rest back."""
    rng = np.random.default_rng(13)
    jacobians = []
    for trial in range(24):
        n = 3 + trial % 6
        j = rng.normal(size=(n, 1 + trial % (n - 1)))
        if trial % 3 == 1:
            j[0] = -j[1]  # two opposed gradients
        jacobians.append(torch.from_numpy(j))
    fast, general = _on_both_paths(name, options, [j @ j.T for j in jacobians], monkeypatch)
    for j, wa, wb in zip(jacobians, fast, general, strict=True):
        a, b = wa @ j, wb @ j
        scale = float(j.norm(dim=1).max())
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6 * max(scale, 1.0))
