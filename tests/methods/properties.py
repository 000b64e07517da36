"""One set of property checks for multi-task methods, and which registry entry claims which.

A property check takes a *factory* (``tasks -> fresh, set-up method``) so that the same assert
serves the registry sweep of ``test_conformance.py`` (entries built with their
``example_params``) and the hand-picked variants of other tests (MGDA's normalisations, …).
Each check feeds a few random cases, two steps each (stateful methods must keep the property
after their state has moved), and compares what the method does with the property.

``CLAIMS`` declares, per registry entry, the properties its paper (or, for a departure we made,
its docstring) claims, with the source; every registry entry must be listed. Permutation
equivariance is everyone's default and is declared by the flag ``permutation_equivariant``
instead (False for random task orders); :func:`check_permutation_equivariant` checks it over
the conformance schedule (subsets of the tasks, epochs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polytask.methods import METHODS, Method
from polytask.methods.base import Update

from .helpers import build, direction, make_step, names

Factory = Callable[[tuple[str, ...]], Method]

#: (T, P) of the random cases: full rank, T = P and rank-deficient (T > P)
SHAPES: tuple[tuple[int, int], ...] = ((2, 6), (3, 10), (4, 4), (5, 4), (8, 3))
STEPS = 2  # steps per case, on one method


@dataclass(frozen=True)
class Claim:
    """A property a method's paper claims. ``source`` says where; ``max_tasks`` restricts it to
    at most that many tasks; ``independent`` to linearly independent gradients (T ≤ P here: the
    paper assumes no Pareto-stationary point, where 0 is in the hull of the gradients);
    ``up_to_sign`` accepts a reversed direction as well (parallel); ``scales`` are the factors of
    the scale checks."""

    source: str
    max_tasks: int | None = None
    independent: bool = False
    up_to_sign: bool = False
    scales: tuple[float, ...] = (1e-3, 7.0)


def factory(name: str) -> Factory:
    """Fresh registry entry ``name`` with its example parameters, set up for the given tasks."""
    return lambda tasks: build(name, tasks)


def cases(seed: int = 0, shapes: Sequence[tuple[int, int]] = SHAPES):
    """Random (J, losses) sequences: one list of ``STEPS`` steps per shape."""
    gen = torch.Generator().manual_seed(seed)
    for t, p in shapes:
        yield [(torch.randn(t, p, generator=gen, dtype=torch.float64),
                torch.rand(t, generator=gen, dtype=torch.float64) + 0.2) for _ in range(STEPS)]


def _steps(make: Factory, claim: Claim | None):
    for sequence in cases():
        t, p = sequence[0][0].shape
        if claim is not None and ((claim.max_tasks is not None and t > claim.max_tasks)
                                  or (claim.independent and t > p)):
            continue
        yield make(names(t)), sequence


# --- the properties ---------------------------------------------------------------------------------


def check_non_conflicting(make: Factory, claim: Claim | None = None, *, tol: float = 1e-9) -> None:
    """gᵢᵀd ≥ 0 for every task: the update does not increase any task loss to first order."""
    for method, sequence in _steps(make, claim):
        for index, (j, losses) in enumerate(sequence):
            d = direction(method(make_step(method, j, losses, index=index)), j)
            dots = j @ d
            assert bool((dots >= -tol * j.norm() ** 2).all()), f"conflicts at {tuple(j.shape)}: gᵢᵀd = {dots}"


def check_scale_free(make: Factory, claim: Claim | None = None) -> None:
    """Multiplying every task gradient by the same c > 0 leaves the weights unchanged and d scales by
    c. With T > P only d is compared: 0 is then often in the hull and the weights are not unique."""
    for c in (claim.scales if claim is not None else Claim("").scales):
        for (plain, sequence), (scaled, _) in zip(_steps(make, claim), _steps(make, claim), strict=True):
            for index, (j, losses) in enumerate(sequence):
                a = plain(make_step(plain, j, losses, index=index))
                b = scaled(make_step(scaled, c * j, losses, index=index))
                if j.shape[0] <= j.shape[1]:
                    torch.testing.assert_close(b.weights, a.weights, rtol=1e-6, atol=1e-9,
                                               msg=lambda m, s=tuple(j.shape), c=c: f"weights at {s}, c = {c}: {m}")
                torch.testing.assert_close(direction(b, c * j), c * direction(a, j), rtol=1e-6,
                                           atol=1e-9 * c * float(j.norm()))


def check_loss_scale_invariant(make: Factory, claim: Claim | None = None) -> None:
    """Multiplying task i's loss by cᵢ > 0 (so its gradient by cᵢ too) changes the update only by a
    positive factor (any non-zero factor with ``up_to_sign``): its direction is the same."""
    gen = torch.Generator().manual_seed(123)
    for (plain, sequence), (scaled, _) in zip(_steps(make, claim), _steps(make, claim), strict=True):
        c = 10 ** (4 * torch.rand(len(sequence[0][0]), generator=gen, dtype=torch.float64) - 2)  # 1e-2 … 1e2
        for index, (j, losses) in enumerate(sequence):
            d = direction(plain(make_step(plain, j, losses, index=index)), j)
            ds = direction(scaled(make_step(scaled, c[:, None] * j, c * losses, index=index)), c[:, None] * j)
            cos = float(d @ ds / (d.norm() * ds.norm()))
            got = abs(cos) if claim is not None and claim.up_to_sign else cos
            assert abs(got - 1) < 1e-6, f"direction changed at {tuple(j.shape)} with scales {c.tolist()}: cos = {cos}"


def check_linear_under_scaling(make: Factory, claim: Claim | None = None) -> None:
    """c ↦ A(diag(c) J) is linear on c > 0 (TorchJD's "linear under scaling")."""
    gen = torch.Generator().manual_seed(321)
    for sequence in cases():
        j, losses = sequence[0]
        c1, c2 = (torch.rand(len(j), generator=gen, dtype=torch.float64) + 0.1 for _ in range(2))

        def aggregate(c: Tensor, j: Tensor = j, losses: Tensor = losses) -> Tensor:
            method = make(names(len(j)))
            return direction(method(make_step(method, c[:, None] * j, losses)), c[:, None] * j)

        scale = float(j.norm())
        torch.testing.assert_close(aggregate(c1 + c2), aggregate(c1) + aggregate(c2), rtol=1e-6, atol=1e-9 * scale)
        torch.testing.assert_close(aggregate(3 * c1), 3 * aggregate(c1), rtol=1e-6, atol=1e-9 * scale)


# --- over a schedule of steps (subsets, epochs): the conformance suite's feed ----------------------

TASKS = ("a", "b", "c", "d")
P = 7
#: (active tasks, epoch) of the steps fed in order; subsets include a single task (round robin).
SCHEDULE: list[tuple[tuple[str, ...], int]] = [
    (TASKS, 0), (("c", "a"), 0), (("b", "c", "d"), 1), (("d",), 1), (TASKS, 2), (("a", "d", "b"), 2)]


def schedule_data(index: int, tasks: Sequence[str]) -> tuple[Tensor, Tensor]:
    """Losses and Jacobian of step ``index``: the same values for a task whatever the order."""
    gen = torch.Generator().manual_seed(1000 + index)
    losses = torch.rand(len(TASKS), generator=gen, dtype=torch.float64) + 0.1
    j = torch.randn(len(TASKS), P, generator=gen, dtype=torch.float64)
    rows = [TASKS.index(t) for t in tasks]
    return losses[rows], j[rows]


def feed(method: Method, schedule: Sequence[tuple[tuple[str, ...], int]] = SCHEDULE, *, seed: int = 0,
         start: int = 0) -> list[Update]:
    """Call ``method`` once per step of ``schedule`` (step index ``start`` + k, random stream ``seed``),
    with the end-of-epoch hook between epochs; the updates, detached."""
    out = []
    for k, (tasks, epoch) in enumerate(schedule, start=start):
        if k > 0 and epoch != SCHEDULE[k - 1][1]:
            method.on_epoch_end(epoch - 1, {t: 1.0 / (1 + k + i) for i, t in enumerate(TASKS)},
                                {t: {"accuracy": 0.5 + 0.1 * i} for i, t in enumerate(TASKS)})
        losses, j = schedule_data(k, tasks)
        update = method(make_step(method, j, losses, tasks=tasks, index=k, seed=seed, epoch=epoch))
        out.append(Update(update.weights.detach().clone(),
                          None if update.direction is None else update.direction.detach().clone()))
    return out


def check_permutation_equivariant(make: Callable[[], Method]) -> None:
    """Permuting the active tasks permutes the weights and keeps the direction, over the schedule."""
    perm = [2, 0, 3, 1]
    permuted = [(tuple(tasks[i] for i in perm) if len(tasks) == 4 else tasks[::-1], e) for tasks, e in SCHEDULE]
    for (tasks, _), (ptasks, _), a, b in zip(SCHEDULE, permuted, feed(make()), feed(make(), permuted), strict=True):
        order = [tasks.index(t) for t in ptasks]
        torch.testing.assert_close(b.weights, a.weights[order], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, ts=ptasks: f"weights on {ts}: {m}")
        if a.direction is not None:
            torch.testing.assert_close(b.direction, a.direction, rtol=1e-4, atol=1e-5,
                                       msg=lambda m, ts=ptasks: f"direction on {ts}: {m}")


CHECKS: dict[str, Callable[..., None]] = {
    "non_conflicting": check_non_conflicting,
    "scale_free": check_scale_free,
    "loss_scale_invariant": check_loss_scale_invariant,
    "linear_under_scaling": check_linear_under_scaling,
}

_TORCHJD = "Quinton & Rey, Jacobian Descent for Multi-Objective Optimization, 2024, Table 1"

#: What each registry entry's paper claims (entries claiming nothing beyond the universal contract
#: map to {}). Every registry entry must be listed: a new method states its properties.
CLAIMS: dict[str, dict[str, Claim]] = {
    "aligned_mtl": {"scale_free": Claim("Senushkin et al. 2023: B = σ V Σ⁻¹ Vᵀ depends on G up to scale")},
    "cagrad": {"scale_free": Claim("docstring: the weights do not depend on the scale of G")},
    "auto_lambda": {},
    "cosmos": {},
    "cr_mogm": {"scale_free": Claim("Zhou et al. 2022: an average of its inner MGDA's scale-free weights (unique when "
                                    "the gradients are independent)", independent=True)},
    "config": {"non_conflicting": Claim("Liu et al. 2024: the update has equal positive cosine with every gᵢ",
                                        independent=True),
               "scale_free": Claim("Liu et al. 2024: built from the unit gradients"),
               "loss_scale_invariant": Claim("Liu et al. 2024: the direction depends on the unit gradients only",
                                             independent=True)},
    "db_mtl": {"loss_scale_invariant": Claim("Lin et al. 2023: log-loss gradients rescaled to the largest norm")},
    "dtp": {},
    "dualproj": {"non_conflicting": Claim(_TORCHJD), "scale_free": Claim(_TORCHJD + " (projection onto a cone)")},
    "dwa": {},
    "equal": {"linear_under_scaling": Claim(_TORCHJD + " (Mean)")},
    "fairgrad": {"non_conflicting": Claim("Ban & Ji 2024: Gw = w^(−1/α) > 0, so gᵢᵀd > 0", independent=True),
                 "loss_scale_invariant": Claim("Ban & Ji 2024: α = 1 (the default) is Nash-MTL's proportional "
                                               "fairness, invariant to loss scales", independent=True)},
    "excess_mtl": {},
    "famo": {"loss_scale_invariant": Claim("Liu et al. 2023: balances log-loss decreases, w ∝ zᵢ / Lᵢ")},
    "forum": {},
    "gls": {"loss_scale_invariant": Claim("Chennupati et al. 2019: the geometric mean's gradient direction")},
    "graddrop": {},
    "gradnorm": {},
    # the cosines carry LibMTL's and TorchJD's ε = 1e-8 in ‖gᵢ‖‖gⱼ‖ + ε: scale-free well above that, and
    # with T > P the T(T−1) sequential corrections amplify that ε past the tolerance
    "gradvac": {"scale_free": Claim("Wang et al. 2021: works on cosines and ratios of norms", independent=True,
                                    scales=(7.0, 1e3))},
    "great": {},
    "imtl": {"scale_free": Claim("Liu et al. 2021: IMTL-G's weights do not depend on the scale of G"),
             "loss_scale_invariant": Claim("Liu et al. 2021: IMTL-G on the scaled gradients keeps its direction "
                                           "(d parallel; its sign follows Σ αᵢ = 1)", independent=True,
                                           up_to_sign=True)},
    "imtl_g": {"scale_free": Claim("docstring: w does not depend on the scale of G"),
               "loss_scale_invariant": Claim("Liu et al. 2021: impartial, scale-invariant to the task losses "
                                             "(d parallel; its sign follows Σ wᵢ = 1)", independent=True,
                                             up_to_sign=True)},
    "imtl_l": {},
    "inverse_size": {},
    "metabalance": {},
    "mgda": {"non_conflicting": Claim("Désidéri 2012; Sener & Koltun 2018: the min-norm point of the hull "
                                      "is a common descent direction"),
             "scale_free": Claim("docstring: whatever the scale of the gradients")},
    "mgda_ub": {"non_conflicting": Claim("Sener & Koltun 2018: MGDA on the Gramian it is given"),
                "scale_free": Claim("as MGDA")},
    "moco": {},
    "modo": {},
    "moml": {},
    "nash_mtl": {"non_conflicting": Claim("Navon et al. 2022, Claim 3.1: gᵢᵀd = 1/wᵢ > 0", independent=True),
                 "loss_scale_invariant": Claim("Navon et al. 2022, Sec. 3: the bargaining solution is invariant "
                                               "to the scale of each task's utility", independent=True)},
    "pbi": {},
    "pcd": {},
    "pcgrad": {"non_conflicting": Claim("Yu et al. 2020, Theorem 1 (two tasks)", max_tasks=2),
               "scale_free": Claim("Yu et al. 2020: projections are scale-free")},
    "rlw": {},
    "static": {},
    "sdmgrad": {},
    "stch": {},
    "uncertainty": {},
    "upgrad": {"non_conflicting": Claim(_TORCHJD), "scale_free": Claim(_TORCHJD),
               "linear_under_scaling": Claim(_TORCHJD)},
    "warmup": {},
}


def claimed() -> list[tuple[str, str]]:
    """(registry name, property) for every claim."""
    return [(name, prop) for name in METHODS.names() for prop in CLAIMS.get(name, {})]


def check(name: str, prop: str) -> None:
    """Check the claimed property ``prop`` of the registry entry ``name``."""
    CHECKS[prop](factory(name), CLAIMS[name][prop])
