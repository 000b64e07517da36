"""Numerical robustness of every registered method at degenerate inputs (issue 20).

Every entry of ``polytask.methods.METHODS`` meets, at every scale from 1e-12 to 1e12 of the task
gradients (and losses) and in float64, float32 and bfloat16:

- a rank-1 Gramian (all gradients positive multiples of one vector);
- exactly and nearly anti-parallel gradients, a Pareto-stationary point that every run reaching a
  trade-off meets (the near pair is the one that crashed Nash-MTL in issue 20);
- two opposed gradients next to an independent third one;
- a task whose gradient is zero, and all gradients zero;
- two duplicated tasks (same gradient, same loss, same data size);
- a single task.

Universal properties (every method): no exception, weights of shape (T,) and finite, a direction
(where the method gives one) of shape (P,) and finite, on the first step and, for stateful
methods, on a second step that follows it; with one task, positive weights and a direction along
the task's gradient. Besides, each method meets its documented behaviour at these points (``BEHAVIOUR``): the paper's,
or the fallback stated under "Departures" in its docstring. Methods with needs == "jacobian" get
J and the Gramian G = J Jᵀ computed from it in the step's dtype, as the engine does.

Every call to a method goes through :func:`run`, the one place that knows the method-call
contract.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import pytest
import torch
from torch import Tensor

from polytask.methods import METHODS, Method, Step
from polytask.methods.base import example_method

pytestmark = pytest.mark.usefixtures("one_thread")

# --- the one call site of the method contract -----------------------------------------------------


class Out(NamedTuple):
    weights: Tensor
    direction: Tensor | None


def run(method: Method, step: Step) -> Out:
    """Weights (and direction, for methods that give one) of ``method`` at ``step``."""
    update = method(step)
    return Out(update.weights, update.direction)


# --- inputs ----------------------------------------------------------------------------------------

P = 6
_GEN = torch.Generator().manual_seed(20)
A, B = torch.randn(2, P, generator=_GEN, dtype=torch.float64)
ZERO = torch.zeros(P, dtype=torch.float64)


def _pad(*values: float) -> Tensor:
    return torch.tensor(list(values) + [0.0] * (P - len(values)), dtype=torch.float64)


@dataclass(frozen=True)
class Case:
    jacobian: Tensor  # float64, unscaled
    losses: tuple[float, ...]
    #: 0 lies in the convex hull of the gradients: no update improves every task.
    pareto_stationary: bool


CASES: dict[str, Case] = {
    "rank1": Case(torch.stack([A, 2 * A, 0.5 * A]), (0.5, 1.0, 2.0), False),
    "anti_parallel": Case(torch.stack([A, -2 * A]), (0.5, 1.0), True),
    # issue 20: g1 = (−0.199, −2.5e−4), g2 = (0.807, 1.3e−3), stationary up to float32 precision
    "near_anti_parallel": Case(torch.stack([_pad(-0.199, -2.5e-4), _pad(0.807, 1.3e-3)]), (0.5, 1.0), False),
    "opposed_and_third": Case(torch.stack([A, -A, B]), (0.5, 1.0, 2.0), True),
    "zero_gradient": Case(torch.stack([A, ZERO, B]), (0.5, 1.0, 2.0), True),
    "all_zero": Case(torch.stack([ZERO, ZERO]), (0.5, 1.0), True),
    "duplicated": Case(torch.stack([A, A, B]), (1.0, 1.0, 2.0), False),
    "single": Case(A[None], (0.7,), False),
}
SCALES = (1e-12, 1.0, 1e12)
DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
#: Relative tolerance of the documented properties, by the dtype of the inputs.
TOL = {torch.float64: 1e-6, torch.float32: 1e-3, torch.bfloat16: 6e-2}


def tasks_of(case: Case) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(len(case.jacobian)))


def build(name: str, tasks: tuple[str, ...]) -> Method:
    """A fresh method with its ``example_params``, set up for ``tasks``."""
    method = example_method(name)
    method.setup(tasks, sizes={t: 100 for t in tasks})  # equal sizes: duplicated tasks stay identical
    return method


def make_step(method: Method, case: Case, scale: float, dtype: torch.dtype, index: int = 0) -> Step:
    j = (scale * case.jacobian).to(dtype)
    needs = method.needs
    return Step(tasks=tasks_of(case), losses=(scale * torch.tensor(case.losses, dtype=torch.float64)).to(dtype),
                index=index, generator=torch.Generator().manual_seed(index),
                gramian=None if needs == "losses" else j @ j.T, jacobian=j if needs == "jacobian" else None)


# --- documented behaviour ----------------------------------------------------------------------


@dataclass
class Ctx:
    """What a behaviour check sees: the case, the exact inputs and the method's first output."""

    name: str
    case_name: str
    case: Case
    scale: float
    dtype: torch.dtype
    method: Method
    w: Tensor  # float64
    d: Tensor | None  # float64

    @property
    def tol(self) -> float:
        return TOL[self.dtype]

    @property
    def exact(self) -> bool:
        return self.dtype == torch.float64

    @property
    def j(self) -> Tensor:
        return self.scale * self.case.jacobian

    @property
    def g(self) -> Tensor:
        return self.j @ self.j.T

    @property
    def losses(self) -> Tensor:
        return self.scale * torch.tensor(self.case.losses, dtype=torch.float64)

    @property
    def t(self) -> int:
        return len(self.case.jacobian)

    def where(self) -> str:
        return f"{self.name} on {self.case_name} at scale {self.scale:g} in {self.dtype}: w={self.w.tolist()}"


def close(ctx: Ctx, got: Tensor | float, want: Tensor | float, what: str, *, scale: float | None = None) -> None:
    got, want = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    ref = float(want.abs().max()) if scale is None else scale
    err = float((got - want).abs().max())
    assert err <= ctx.tol * max(ref, 1e-300), f"{ctx.where()}: {what}: {got.tolist()} != {want.tolist()}"


def at_least(ctx: Ctx, got: Tensor, bound: float | Tensor, what: str, *, scale: float = 1.0) -> None:
    slack = ctx.tol * scale
    assert bool((got >= torch.as_tensor(bound, dtype=torch.float64) - slack).all()), f"{ctx.where()}: {what}: {got.tolist()}"


def ones(ctx: Ctx, value: float = 1.0) -> None:
    close(ctx, ctx.w, torch.full((ctx.t,), value, dtype=torch.float64), "weights")


def duplicates_equal(ctx: Ctx) -> None:
    if ctx.case_name == "duplicated":
        close(ctx, ctx.w[0], ctx.w[1], "duplicated tasks get the same weight", scale=float(ctx.w.abs().max()))


def gram_scale(ctx: Ctx) -> float:
    """A scale for wᵀGw and Gw: the largest squared gradient norm (1 when all are zero)."""
    return float(ctx.g.diagonal().max()) or 1.0


def norm_sq(ctx: Ctx) -> float:
    return float(ctx.w @ ctx.g @ ctx.w)


def simplex(ctx: Ctx) -> None:
    at_least(ctx, ctx.w, 0.0, "weights on the simplex are >= 0")
    close(ctx, ctx.w.sum(), 1.0, "weights on the simplex sum to 1")


def mgda(ctx: Ctx) -> None:
    """Sener & Koltun (2018): the min-norm point of the hull; 0 at a Pareto-stationary point."""
    simplex(ctx)
    if ctx.exact:
        gw, value = ctx.g @ ctx.w, norm_sq(ctx)
        at_least(ctx, gw, value, "optimality gⱼᵀd >= ‖d‖²", scale=gram_scale(ctx))
        if ctx.case.pareto_stationary:
            close(ctx, value, 0.0, "‖d‖² at a Pareto-stationary point", scale=gram_scale(ctx))


def dual_cone(ctx: Ctx) -> None:
    """Quinton & Rey (2024): w >= 1/T and no task conflicts with the update (Gw >= 0)."""
    at_least(ctx, ctx.w, 1.0 / ctx.t, "weights >= 1/T")
    duplicates_equal(ctx)
    if ctx.exact:
        at_least(ctx, ctx.g @ ctx.w, 0.0, "non-conflicting Gw >= 0", scale=gram_scale(ctx) * float(ctx.w.abs().max()))
        if ctx.case_name in ("anti_parallel", "all_zero"):  # the dual cone is {d : Jd = 0}
            close(ctx, norm_sq(ctx), 0.0, "‖d‖² when the dual cone is the null space", scale=gram_scale(ctx))


def cagrad(ctx: Ctx) -> None:
    """Liu et al. (2021): w = (1/T + y)/(1 + c²) with y >= 0 (c = 0.4 by default)."""
    c = ctx.method.c
    at_least(ctx, ctx.w, 1.0 / (ctx.t * (1 + c * c)), "weights >= 1/(T(1 + c²))")
    if ctx.case_name == "all_zero":  # no gradient: the mean
        ones(ctx, 1.0 / (ctx.t * (1 + c * c)))


def imtl_g(ctx: Ctx) -> None:
    """Liu et al. (2021): Σw = 1 with equal projections on the unit gradients where they exist;
    TorchJD's G⁺n otherwise (see its docstring's Departures)."""
    if ctx.case_name == "all_zero":
        ones(ctx, 0.0)
        return
    close(ctx, ctx.w.sum(), 1.0, "Σw")
    duplicates_equal(ctx)
    if ctx.case_name == "anti_parallel":  # g₂ = −2g₁: w = (1, −c)/(1 − c)
        close(ctx, ctx.w, torch.tensor([-1.0, 2.0], dtype=torch.float64), "w at g₂ = −2g₁")
    if ctx.case_name == "zero_gradient":
        close(ctx, ctx.w[1], 0.0, "a zero gradient's weight", scale=1.0)
    if ctx.exact and ctx.case_name in ("duplicated", "rank1", "near_anti_parallel", "single", "zero_gradient"):
        keep = ctx.g.diagonal() > 0
        norms = ctx.g.diagonal()[keep].sqrt()
        proj = (ctx.g @ ctx.w)[keep] / norms
        close(ctx, proj, proj.mean().expand_as(proj), "equal projections", scale=float(norms.max()) * float(ctx.w.abs().max()))


def nash_mtl(ctx: Ctx) -> None:
    """Navon et al. (2022): w > 0 with Gw = κ/w (κ ≤ 1 from max_norm); previous weights (ones at
    the first step) at a Pareto-stationary point, then clipped to ‖d‖ <= max_norm."""
    assert bool((ctx.w > 0).all()), ctx.where()
    if ctx.case.pareto_stationary:
        close(ctx, ctx.w / ctx.w.max(), torch.ones(ctx.t, dtype=torch.float64), "fallback: ones (clipped)")
    elif ctx.exact:
        utility = ctx.w * (ctx.g @ ctx.w)  # wᵢ gᵢᵀd: the same for every task
        close(ctx, utility, utility.mean().expand_as(utility), "wᵢ(Gw)ᵢ equal")
    if ctx.exact:
        assert norm_sq(ctx) <= ctx.method.max_norm**2 * (1 + 1e-6) or ctx.method.max_norm == 0, ctx.where()


def pcgrad(ctx: Ctx) -> None:
    """Yu et al. (2020): exactly opposed gradients project each other to zero."""
    if ctx.exact and ctx.case_name == "anti_parallel":
        close(ctx, norm_sq(ctx), 0.0, "‖d‖²", scale=gram_scale(ctx) * float(ctx.w.abs().max()) ** 2)


def aligned_mtl(ctx: Ctx) -> None:
    """Senushkin et al. (2023): identity on a zero Gramian; the projection of 1 on range G at rank 1."""
    if ctx.case_name in ("all_zero", "single"):
        ones(ctx)
    duplicates_equal(ctx)
    if ctx.exact and ctx.case_name in ("rank1", "anti_parallel"):
        v = ctx.case.jacobian @ ctx.case.jacobian[0]
        v = v / v.norm()
        close(ctx, ctx.w, v * v.sum(), "w = VVᵀ1 at rank 1")


def config(ctx: Ctx) -> None:
    """Liu et al. (2025): zero gradients get weight 0; exactly opposed gradients give no update."""
    if ctx.case_name in ("all_zero", "anti_parallel"):
        ones(ctx, 0.0)
    elif ctx.case_name == "zero_gradient":
        close(ctx, ctx.w[1], 0.0, "a zero gradient's weight", scale=float(ctx.w.abs().max()))
    elif ctx.case_name == "single":
        ones(ctx)
    duplicates_equal(ctx)


def fairgrad(ctx: Ctx) -> None:
    """Ban & Ji (2024): w > 0; Gw = w^(−1/α) where it has a solution."""
    assert bool((ctx.w > 0).all()), ctx.where()
    duplicates_equal(ctx)
    if ctx.exact and not ctx.case.pareto_stationary:
        close(ctx, ctx.g @ ctx.w, ctx.w.pow(-1.0 / ctx.method.alpha), "Gw = w^(−1/α)")


def moco(ctx: Ctx) -> None:
    """Fernando et al. (2023): λ on the simplex; d = Yλ with Y = J at the first step."""
    simplex(ctx)
    if ctx.exact:
        close(ctx, ctx.d, ctx.w @ ctx.j, "first direction = λᵀJ")


def unit_weights_direction(ctx: Ctx) -> None:
    """Weights 1 (the direction carries the method); no gradient gives no direction."""
    ones(ctx)
    if ctx.case_name == "all_zero":
        close(ctx, ctx.d, torch.zeros(P, dtype=torch.float64), "direction", scale=1.0)


def gls(ctx: Ctx) -> None:
    """Chennupati et al. (2019): wᵢLᵢ = (Π L)^(1/T)/T, losses floored at 1e-8."""
    floored = ctx.losses.clamp_min(1e-8)
    close(ctx, ctx.w * floored, torch.exp(floored.log().mean()).expand(ctx.t) / ctx.t, "wᵢLᵢ")


def famo(ctx: Ctx) -> None:
    """Liu et al. (2023): fresh logits give wᵢ ∝ 1/Lᵢ with Σw = 1 (losses floored at 1e-8)."""
    floored = ctx.losses.clamp_min(1e-8)
    close(ctx, ctx.w.sum(), 1.0, "Σw")
    close(ctx, ctx.w * floored, (ctx.w * floored).mean().expand(ctx.t), "wᵢLᵢ equal")


def rlw(ctx: Ctx) -> None:
    """Lin et al. (2022): w = T·softmax(z), z ~ N(0, I)."""
    assert bool((ctx.w > 0).all()), ctx.where()
    close(ctx, ctx.w.sum(), float(ctx.t), "Σw")


def stch(ctx: Ctx) -> None:
    """Lin et al. (2024), nadir 1: w = softmax(L/μ) (a hard max once the losses dwarf μ)."""
    close(ctx, ctx.w, torch.softmax(ctx.losses / ctx.method.mu, dim=0), "w = softmax(L/μ)", scale=1.0)


def db_mtl(ctx: Ctx) -> None:
    """Lin et al. (2023), first step: wᵢ = maxⱼ nⱼ / (nᵢLᵢ) with nᵢ = ‖gᵢ‖/Lᵢ, norms and losses
    floored at 1e-8 (all weights 0 when every gradient is, as the authors' max‖ĝ‖/(‖ĝᵢ‖ + 1e-8))."""
    losses = ctx.losses.clamp_min(1e-8)
    n = ctx.g.diagonal().sqrt() / losses
    close(ctx, ctx.w, n.max() / (n.clamp_min(1e-8) * losses), "wᵢ = max n / (nᵢLᵢ)")


def gradnorm(ctx: Ctx) -> None:
    """Chen et al. (2018): the first step uses the initial weights 1."""
    ones(ctx)


def pcd(ctx: Ctx) -> None:
    """TorchJD's PCD: d = 0 when the primary gradient (t0) is 0; else wₚ > 0 and ‖d‖ = ‖gₚ‖ or d = 0."""
    if float(ctx.g[0, 0]) == 0:
        ones(ctx, 0.0)
        return
    at_least(ctx, ctx.w[0:1], 0.0, "the primary weight")
    if ctx.exact and norm_sq(ctx) > 0:
        close(ctx, norm_sq(ctx), float(ctx.g[0, 0]), "‖d‖² = ‖gₚ‖²", scale=gram_scale(ctx))
    if ctx.case_name == "single":
        ones(ctx)


def sdmgrad(ctx: Ctx) -> None:
    """Xiao et al. (2023): (w + λ/T)/(1 + λ) with w on the simplex: Σ = 1, each >= λ/(T(1 + λ))."""
    lam = ctx.method.lamda
    close(ctx, ctx.w.sum(), 1.0, "Σw")
    at_least(ctx, ctx.w, lam / (ctx.t * (1 + lam)), "weights >= λ/(T(1 + λ))")


def one_task_ones(ctx: Ctx) -> None:
    """Scalarisations whose gradient is the preference (1) with one task; duplicates weighted alike."""
    if ctx.case_name == "single":
        ones(ctx)
    duplicates_equal(ctx)


BEHAVIOUR: dict[str, Callable[[Ctx], None]] = {
    "aligned_mtl": aligned_mtl,
    "cagrad": cagrad,
    "auto_lambda": lambda ctx: ones(ctx, 0.1),  # first step: no hypergradient yet, λ = init
    "config": config,
    "cosmos": one_task_ones,
    "cr_mogm": mgda,  # first step: the inner MGDA's weights
    "db_mtl": db_mtl,
    "dtp": ones,  # no KPI known yet: 1
    "dualproj": dual_cone,
    "dwa": ones,  # fewer than two epochs: 1
    "equal": ones,
    "excess_mtl": ones,  # a task's first step sets its baseline: weights 1
    "fairgrad": fairgrad,
    "famo": famo,
    "forum": simplex,  # softmax weights
    "gls": gls,
    "graddrop": unit_weights_direction,
    "gradnorm": gradnorm,
    "gradvac": lambda ctx: None,  # universal properties only (random orders, EMA targets)
    "great": unit_weights_direction,
    "imtl": imtl_g,  # scales e^0 = 1: IMTL-G's weights
    "imtl_g": imtl_g,
    "imtl_l": ones,  # e^0
    "inverse_size": ones,  # equal sizes
    "metabalance": unit_weights_direction,
    "mgda": mgda,
    "mgda_ub": mgda,
    "moco": moco,
    "modo": simplex,  # λ projected onto the simplex
    "moml": simplex,  # softmax weights
    "nash_mtl": nash_mtl,
    "pbi": one_task_ones,
    "pcd": pcd,
    "pcgrad": pcgrad,
    "rlw": rlw,
    "static": ones,
    "sdmgrad": sdmgrad,
    "stch": stch,
    "uncertainty": lambda ctx: ones(ctx, 0.5),  # ½e^0 (regression)
    "upgrad": dual_cone,
    "warmup": ones,  # step 0 of the warm-up: the static weights 1
}

#: (method, case, dtype) cases known to fail, with the reason (none today).
XFAIL: dict[tuple[str, str, str], str] = {}


# --- the battery ---------------------------------------------------------------------------------


def universal(name: str, where: str, case: Case, out: Out) -> None:
    t = len(case.jacobian)
    assert out.weights.shape == (t,), f"{name} {where}: weights of shape {tuple(out.weights.shape)}"
    assert bool(torch.isfinite(out.weights).all()), f"{name} {where}: non-finite weights {out.weights.tolist()}"
    if out.direction is not None:
        assert out.direction.shape == (P,), f"{name} {where}: direction of shape {tuple(out.direction.shape)}"
        assert bool(torch.isfinite(out.direction).all()), f"{name} {where}: non-finite direction {out.direction.tolist()}"
    if t == 1:
        assert bool((out.weights > 0).all()), f"{name} {where}: one task's weight {out.weights.tolist()} is not > 0"
        if out.direction is not None:
            d, g = out.direction.double(), case.jacobian[0]
            cos = float(d @ g) / max(float(d.norm() * g.norm()), 1e-300)
            assert cos > 0.99, f"{name} {where}: one task's direction is not along its gradient (cos {cos})"


def check_inputs(name: str, case_name: str, dtype_name: str) -> None:
    """Every scale of one case in one dtype: universal properties, then the documented behaviour."""
    case, dtype = CASES[case_name], DTYPES[dtype_name]
    for scale in SCALES:
        method = build(name, tasks_of(case))
        where = f"on {case_name} at scale {scale:g} in {dtype_name}"
        outs = []
        for index in range(2 if method.stateful else 1):  # a second step exercises the state's update
            try:
                out = run(method, make_step(method, case, scale, dtype, index))
            except Exception as error:  # noqa: BLE001 - report which input raised
                raise AssertionError(f"{name} {where}, step {index}: {type(error).__name__}: {error}") from error
            universal(name, f"{where}, step {index}", case, out)
            outs.append(out)
        behaviour = BEHAVIOUR.get(name)  # a method missing there fails test_every_method_states_...
        if behaviour is not None:
            first = outs[0]
            behaviour(Ctx(name, case_name, case, scale, dtype, method, first.weights.detach().double(),
                          None if first.direction is None else first.direction.detach().double()))


@pytest.mark.parametrize("case_name", list(CASES))
@pytest.mark.parametrize("name", METHODS.names())
def test_degenerate_inputs(name: str, case_name: str) -> None:
    """All dtypes of one (method, case); the ``XFAIL`` ones must fail, and then xfail the test."""
    expected = []
    for dtype_name in DTYPES:
        reason = XFAIL.get((name, case_name, dtype_name))
        try:
            check_inputs(name, case_name, dtype_name)
        except AssertionError as error:
            if reason is None:
                raise
            expected.append(f"{dtype_name}: {reason} [{str(error).splitlines()[0]}]")
            continue
        assert reason is None, f"{name} on {case_name} in {dtype_name} passes now: remove its XFAIL entry"
    if expected:
        pytest.xfail("; ".join(expected))


def test_every_method_states_its_degenerate_behaviour() -> None:
    missing = [n for n in METHODS.names() if n not in BEHAVIOUR]
    assert not missing, f"add the documented behaviour at degenerate inputs of {missing} to BEHAVIOUR"
    assert not [n for n in BEHAVIOUR if n not in METHODS], "BEHAVIOUR names methods that are not registered"


def test_cases_are_what_they_claim() -> None:
    """Pareto-stationary ⇔ 0 in the convex hull of the gradients: the stationary cases have a
    cancelling convex combination, the others a direction that improves every task."""
    cancelling = {"anti_parallel": [2 / 3, 1 / 3], "opposed_and_third": [0.5, 0.5, 0.0],
                  "zero_gradient": [0.0, 1.0, 0.0], "all_zero": [0.5, 0.5]}
    for name, case in CASES.items():
        j = case.jacobian
        if case.pareto_stationary:
            w = torch.tensor(cancelling[name], dtype=torch.float64)
            assert bool((w >= 0).all()) and math.isclose(float(w.sum()), 1.0), name
            assert float((w @ j).norm()) <= 1e-15 * float(j.norm()), name
        else:
            # the minimum-norm d with J d = 1 by the SVD pseudo-inverse: torch.linalg.lstsq (gelsy)
            # once returned d = 0 for the ill-conditioned near_anti_parallel pair under CI load
            d = j[0] if name == "rank1" else torch.linalg.pinv(j) @ torch.ones(len(j), dtype=torch.float64)
            assert bool((j @ d > 0).all()), (name, j @ d)


def test_nash_mtl_keeps_its_previous_weights_at_a_pareto_stationary_point() -> None:
    """Navon et al.'s code (and TorchJD's port) keep the last weights when the solver fails."""
    method = METHODS.create("nash_mtl", max_norm=0.0)
    method.setup(("t0", "t1"))
    regular = torch.stack([A, B])
    step = Step(tasks=("t0", "t1"), losses=torch.ones(2, dtype=torch.float64), gramian=regular @ regular.T)
    first = run(method, step).weights
    # the issue-20 pair in float32: at that precision Gw = 1/w has no positive solution
    near = CASES["near_anti_parallel"].jacobian
    low = near.float()
    second = run(method, Step(tasks=("t0", "t1"), losses=torch.ones(2), index=1, gramian=low @ low.T)).weights
    assert second.dtype == torch.float32 and torch.equal(second, first.float()), (second, first)
    # in float64 it has one: the bargaining solution
    g = near @ near.T
    w = run(method, Step(tasks=("t0", "t1"), losses=torch.ones(2, dtype=torch.float64), index=2, gramian=g)).weights
    assert torch.allclose(w * (g @ w), torch.ones(2, dtype=torch.float64), rtol=1e-6, atol=0), w * (g @ w)


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_nash_mtl_issue_20_pair_at_every_scale(dtype_name: str) -> None:
    """The pair of issue 20 crashed ``solve_nash`` (complex Newton decrement) at many scales in
    float32 and bfloat16; in float64 it has a bargaining solution at every scale."""
    dtype = DTYPES[dtype_name]
    pair = torch.tensor([[-0.199, -2.5e-4], [0.807, 1.3e-3]], dtype=torch.float64)
    for k in range(-12, 13):
        method = METHODS.create("nash_mtl", max_norm=0.0)
        method.setup(("t0", "t1"))
        j = (10.0**k * pair).to(dtype)
        w = run(method, Step(tasks=("t0", "t1"), losses=torch.ones(2, dtype=dtype), gramian=j @ j.T)).weights
        assert w.dtype == dtype and bool((w > 0).all()) and bool(torch.isfinite(w).all()), (k, w)
        if dtype == torch.float64:
            g = (10.0**k * pair) @ (10.0**k * pair).T
            assert torch.allclose(w * (g @ w), torch.ones(2, dtype=dtype), rtol=1e-6, atol=0), (k, w * (g @ w))
