"""Aligned-MTL, ConFIG, FairGrad, MoCo, GradDrop and GREAT: paper properties, engine equivalence,
state round-trips, and cross-checks against TorchJD where it implements the same method."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.engine.backward import Engine
from polytask.methods import METHODS, Step, get_method
from polytask.methods._simplex import project_simplex
from polytask.methods.aligned_mtl import balance_transformation

TASKS = ("a", "b", "c")
SHAPES = [(3, 20), (5, 40), (2, 7), (4, 3)]  # the last one is rank-deficient (T > P)


def jacobian(t: int, p: int, seed: int = 0) -> Tensor:
    return torch.randn(t, p, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def gramian_step(j: Tensor) -> Step:
    names = tuple(f"t{i}" for i in range(len(j)))
    return Step(tasks=names, losses=torch.ones(len(j), dtype=j.dtype), gramian=j @ j.T, jacobian=j)


def jacobian_step(j: Tensor, seed: int = 0, tasks: tuple[str, ...] = TASKS) -> Step:
    return Step(tasks=tasks, losses=torch.ones(len(j), dtype=j.dtype), jacobian=j, gramian=j @ j.T,
                generator=torch.Generator().manual_seed(seed))


# --- Aligned-MTL ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t,p", SHAPES)
def test_aligned_mtl_aligned_system_has_equal_singular_values(t: int, p: int) -> None:
    j = jacobian(t, p)
    g = j @ j.T
    b = balance_transformation(g)
    aligned = b @ j
    rank = int(torch.linalg.matrix_rank(j))
    sv = torch.linalg.svdvals(aligned)[:rank]
    smallest = torch.linalg.eigvalsh(g)[-rank:].min().sqrt()
    torch.testing.assert_close(sv, torch.full_like(sv, float(smallest)))
    d = get_method("aligned_mtl").weights(gramian_step(j)) @ j
    if rank == t:  # the update has the same positive inner product λ_min with every aligned gradient
        torch.testing.assert_close(aligned @ d, torch.full((t,), float(smallest) ** 2, dtype=j.dtype))


@pytest.mark.parametrize("t,p", SHAPES)
@pytest.mark.parametrize("scale", ["min", "median", "rmse"])
def test_aligned_mtl_matches_torchjd(t: int, p: int, scale: str) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    j = jacobian(t, p, seed=1)
    ours = get_method("aligned_mtl", scale=scale).weights(gramian_step(j)) @ j
    ref = aggregation.AlignedMTL(pref_vector=torch.ones(t, dtype=j.dtype), scale_mode=scale)(j)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_aligned_mtl_rejects_unknown_scale() -> None:
    with pytest.raises(InvalidParameterError, match="`scale` of `AlignedMTL`"):
        get_method("aligned_mtl", scale="max")


# --- ConFIG --------------------------------------------------------------------------------------

@pytest.mark.parametrize("t,p", SHAPES[:3])
def test_config_has_equal_positive_cosine_with_every_gradient(t: int, p: int) -> None:
    j = jacobian(t, p, seed=2) * torch.tensor([1.0, 10.0, 0.1, 3.0, 0.5], dtype=torch.float64)[:t, None]
    d = get_method("config").weights(gramian_step(j)) @ j
    cos = (j @ d) / (j.norm(dim=1) * d.norm())
    assert bool((cos > 0).all())
    torch.testing.assert_close(cos, torch.full_like(cos, float(cos[0])))
    torch.testing.assert_close(d.norm(), (j @ (d / d.norm())).sum())  # length = sum of projections


@pytest.mark.parametrize("t,p", SHAPES)
def test_config_matches_torchjd(t: int, p: int) -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    j = jacobian(t, p, seed=3)
    ours = get_method("config").weights(gramian_step(j)) @ j
    torch.testing.assert_close(ours, aggregation.ConFIG()(j), rtol=1e-10, atol=1e-10)


def test_config_ignores_zero_gradients() -> None:
    j = jacobian(3, 10)
    j[1] = 0
    w = get_method("config").weights(gramian_step(j))
    assert w[1] == 0 and bool(torch.isfinite(w).all())


# --- FairGrad ------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("t,p", SHAPES)
def test_fairgrad_solves_its_optimality_condition_and_matches_torchjd(alpha: float, t: int, p: int) -> None:
    j = jacobian(t, p, seed=4)
    g = j @ j.T
    w = get_method("fairgrad", alpha=alpha).weights(gramian_step(j))
    assert bool((w > 0).all())
    torch.testing.assert_close(g @ w, w ** (-1 / alpha), rtol=1e-9, atol=1e-9)
    aggregation = pytest.importorskip("torchjd.aggregation")
    torch.testing.assert_close(w @ j, aggregation.FairGrad(alpha=alpha)(j), rtol=1e-6, atol=1e-6)


def test_fairgrad_alpha_one_is_nash_mtl_condition() -> None:
    j = jacobian(4, 30, seed=5)
    g = j @ j.T
    w = get_method("fairgrad", alpha=1.0).weights(gramian_step(j))
    torch.testing.assert_close(g @ w, 1 / w, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(w @ g @ w, torch.tensor(4.0, dtype=w.dtype))  # ‖d‖² = T, as in Nash-MTL
    if "nash_mtl" in METHODS:
        try:
            nash = get_method("nash_mtl", max_norm=0.0, normalize=False)
        except (InvalidParameterError, TypeError):
            return
        nash.setup(gramian_step(j).tasks)
        torch.testing.assert_close(nash.weights(gramian_step(j)), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), "1"])
def test_fairgrad_validates_alpha(bad: object) -> None:
    with pytest.raises(InvalidParameterError, match="`alpha` of `FairGrad`"):
        get_method("fairgrad", alpha=bad)


# --- GradDrop ------------------------------------------------------------------------------------

def test_graddrop_keeps_one_sign_per_coordinate() -> None:
    j = jacobian(3, 500, seed=6)
    d = get_method("graddrop").direction(jacobian_step(j))
    positive, negative = j.clamp(min=0).sum(dim=0), j.clamp(max=0).sum(dim=0)
    assert bool(((d == positive) | (d == negative)).all())
    assert bool((d == positive).any()) and bool((d == negative).any())


def test_graddrop_is_deterministic_under_a_seed_and_leak_one_is_the_sum() -> None:
    j = jacobian(3, 200, seed=7)
    method = get_method("graddrop", leak=0.2)
    first, again = method.direction(jacobian_step(j, seed=3)), method.direction(jacobian_step(j, seed=3))
    assert torch.equal(first, again)
    assert not torch.equal(first, method.direction(jacobian_step(j, seed=4)))
    torch.testing.assert_close(get_method("graddrop", leak=1.0).direction(jacobian_step(j)), j.sum(dim=0))
    assert torch.equal(method.weights(jacobian_step(j)), torch.ones(3, dtype=j.dtype))


def test_graddrop_matches_torchjd_with_the_same_random_stream() -> None:
    aggregation = pytest.importorskip("torchjd.aggregation")
    j = jacobian(3, 300, seed=8)
    for leak in (0.0, 0.3):
        ours = get_method("graddrop", leak=leak).direction(jacobian_step(j, seed=11))
        torch.manual_seed(11)
        ref = aggregation.GradDrop(leak=torch.full((3,), leak, dtype=j.dtype))(j)
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)


def test_graddrop_validates_leak() -> None:
    with pytest.raises(InvalidParameterError, match=r"`leak` of `GradDrop` must be in \[0, 1\]"):
        get_method("graddrop", leak=1.5)


# --- MoCo ----------------------------------------------------------------------------------------

def test_project_simplex() -> None:
    v = torch.tensor([0.5, 2.0, -1.0, 0.3], dtype=torch.float64)
    x = project_simplex(v)
    assert bool((x >= 0).all()) and abs(float(x.sum()) - 1) < 1e-12
    torch.testing.assert_close(project_simplex(x), x)
    # KKT: x = max(v − τ, 0) for one τ
    tau = (v - x)[x > 0]
    torch.testing.assert_close(tau, torch.full_like(tau, float(tau[0])))


def test_moco_lambda_stays_on_the_simplex_with_task_subsets() -> None:
    method = get_method("moco", gamma=5.0, rho=0.1)
    method.setup(TASKS)
    gen = torch.Generator().manual_seed(0)
    for i in range(12):
        tasks = TASKS if i % 3 else ("c", "a")
        j = torch.randn(len(tasks), 8, generator=gen, dtype=torch.float64)
        w = method.weights(jacobian_step(j, tasks=tasks))
        assert bool((w >= 0).all()) and abs(float(w.sum()) - 1) < 1e-9
        assert bool((method.lam >= 0).all()) and abs(float(method.lam.sum()) - 1) < 1e-9
        assert method.direction(jacobian_step(j, tasks=tasks)).shape == (8,)


def test_moco_follows_algorithm_1() -> None:
    beta, gamma, rho = 0.3, 0.2, 0.05
    method = get_method("moco", beta=beta, beta_sigma=0.0, gamma=gamma, gamma_sigma=0.0, rho=rho)
    method.setup(TASKS)
    y, lam = None, torch.full((3,), 1 / 3, dtype=torch.float64)
    for k in range(4):
        j = jacobian(3, 10, seed=20 + k)
        step = jacobian_step(j)
        w = method.weights(step)
        y = j.clone() if y is None else y - beta * (y - j)
        lam = project_simplex(lam - gamma * (y @ y.T + rho * torch.eye(3, dtype=y.dtype)) @ lam)
        torch.testing.assert_close(w, lam)
        torch.testing.assert_close(method.direction(step), lam @ y)


def test_moco_state_round_trips_into_a_fresh_method() -> None:
    method = get_method("moco")
    method.setup(TASKS)
    for k in range(3):
        method.weights(jacobian_step(jacobian(3, 10, seed=k)))
    fresh = get_method("moco")
    fresh.load_state_dict(method.state_dict())
    step = jacobian_step(jacobian(3, 10, seed=9))
    assert torch.equal(fresh.weights(step), method.weights(step))
    assert torch.equal(fresh.direction(step), method.direction(step))


def test_moco_validates_beta() -> None:
    with pytest.raises(InvalidParameterError, match=r"`beta` of `MoCo` must be in \(0, 1\]; found 2"):
        get_method("moco", beta=2)


# --- GREAT ---------------------------------------------------------------------------------------

def separable_steps(n: int, p: int = 16) -> list[Step]:
    gen = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(3, p, generator=gen)
    return [jacobian_step(centres + torch.randn(3, p, generator=gen), seed=i) for i in range(n)]


def test_great_discriminator_learns_and_the_adversarial_term_confuses_it() -> None:
    method = get_method("great", strength=0.2, lr=1e-2)
    method.setup(TASKS)
    losses = []
    for step in separable_steps(40):
        method.weights(step)
        losses.append(float(method.last_loss))
    assert losses[-1] < 0.2 * losses[0]
    step = separable_steps(41)[-1]
    j = step.jacobian
    assert j is not None
    d = method.direction(step)
    pushed = j + 0.2 * j.norm(dim=1, keepdim=True) * method.adversarial(step)
    torch.testing.assert_close(d, pushed.sum(dim=0))
    unit = j / j.norm(dim=1, keepdim=True)
    moved = pushed / pushed.norm(dim=1, keepdim=True)
    with torch.no_grad():
        assert method.discriminator_loss(step, units=moved) > method.discriminator_loss(step, units=unit)


def test_great_state_round_trips_exactly() -> None:
    method = get_method("great", lr=1e-2)
    method.setup(TASKS)
    steps = separable_steps(6)
    for step in steps[:3]:
        method.weights(step)
    fresh = get_method("great", lr=1e-2)
    fresh.setup(TASKS)
    fresh.load_state_dict(method.state_dict())
    for step in steps[3:]:
        assert torch.equal(fresh.weights(step), method.weights(step))
        assert torch.equal(fresh.direction(step), method.direction(step))
    for (name, a), b in zip(method.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert name == "_extra_state" or torch.equal(a, b), name
    assert all(p.grad is None for p in method.parameters())


def test_great_strength_zero_is_the_plain_sum() -> None:
    step = separable_steps(1)[0]
    method = get_method("great", strength=0.0)
    method.setup(TASKS)
    method.weights(step)
    assert step.jacobian is not None
    torch.testing.assert_close(method.direction(step), step.jacobian.sum(dim=0))


# --- engine equivalence --------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(5, 1) for t in TASKS})

    def losses(self) -> dict[str, Tensor]:
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 4, generator=gen), torch.randn(16, 3, generator=gen)
        z = self.encoder(x)
        return {t: ((self.heads[t](z).squeeze(1) - y[:, i] * (i + 1)) ** 2).mean() for i, t in enumerate(TASKS)}


@pytest.mark.parametrize("name", ["aligned_mtl", "config", "fairgrad", "graddrop", "moco", "great"])
def test_engine_applies_the_method(name: str) -> None:
    model = Tiny()
    shared = list(model.encoder.parameters())
    losses = model.losses()
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, shared, retain_graph=True)])
            for loss in losses.values()]
    j = torch.stack(rows)
    heads = [list(model.heads[t].parameters()) for t in TASKS]
    head_grads = [torch.autograd.grad(losses[t], heads[i], retain_graph=True) for i, t in enumerate(TASKS)]

    reference = get_method(name)
    reference.setup(TASKS)
    step = Step(tasks=TASKS, losses=torch.stack(list(losses.values())).detach(), gramian=j @ j.T, jacobian=j,
                generator=torch.Generator().manual_seed(0))
    w = reference.weights(step)
    expected = reference.direction(step) if reference.returns_direction else w @ j

    method = get_method(name)
    method.setup(TASKS)
    weights = Engine(method, shared, seed=0).backward(losses)
    torch.testing.assert_close(torch.tensor([weights[t] for t in TASKS]), w.float())
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    for i in range(3):
        for p, g in zip(heads[i], head_grads[i], strict=True):
            torch.testing.assert_close(p.grad, w[i] * g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["moco", "great"])
def test_state_advances_once_per_step_whichever_call_comes_first(name: str) -> None:
    by_weights, by_direction = get_method(name), get_method(name)
    by_weights.setup(TASKS)
    by_direction.setup(TASKS)
    for k in range(3):
        step_w, step_d = jacobian_step(jacobian(3, 12, seed=k), seed=k), jacobian_step(jacobian(3, 12, seed=k), seed=k)
        by_weights.weights(step_w)
        first = by_direction.direction(step_d)
        assert torch.equal(by_direction.direction(step_d), first)  # a second call on the same step reads
        assert torch.equal(by_weights.direction(step_w), first)
    for (key, a), b in zip(by_weights.state_dict().items(), by_direction.state_dict().values(), strict=True):
        assert key == "_extra_state" or torch.equal(a, b), key
