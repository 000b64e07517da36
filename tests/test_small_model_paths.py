"""The fast paths that keep a small model's step cheap give what the general paths give.

Loss-weighting methods skip gathering their per-task state when every task is active in order, or
keep it on the host and compute on Python floats (RLW, FAMO, DWA); the engine's loss-weighting step
skips the general step's branches;
the training metrics defer the targets' cast and the loss products to the flush; AUROC sorts its
predictions with numpy first; the health check takes the total gradient norm without
``get_total_norm``'s bookkeeping (to float32 round-off on the CPU, where it combines the per-tensor
norms on the host); the engine reuses a constant-weights method's answer. Each other path is
compared with the general computation, bit for bit.
CAGrad's solver, moved onto numpy arrays, must reach the optimum also where two gradients are
exactly opposed (the former code gave the mean gradient in some of those cases).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torchmetrics import classification

from polytask.core.task import Task
from polytask.methods.base import Step, get_method
from polytask.metrics.auroc import BinaryAUROC
from polytask.metrics.tracker import TaskMetrics
from polytask.train.health import GradientMonitor, HealthOptions

TASKS = ("a", "b", "c", "d")


def _general(method):
    """The same method forced onto the general path (gathered rows) on every step."""
    method.all_active = lambda step: False
    return method


@pytest.mark.parametrize("name", ["rlw", "famo", "dwa"])
def test_host_arithmetic_follows_the_tasks_not_their_order(name):
    """RLW, FAMO and DWA compute on Python floats by task position: steps that list the tasks in
    another order get the same weights, permuted, and leave the same state."""
    ordered, shuffled = get_method(name), get_method(name)
    for method in (ordered, shuffled):
        method.setup(TASKS)
    order = (2, 0, 3, 1)
    g = torch.Generator().manual_seed(0)
    for index in range(12):
        losses = torch.rand(len(TASKS), generator=g, dtype=torch.float64) + 0.05
        a = ordered(Step(tasks=TASKS, losses=losses, index=index, seed=3)).weights
        b = shuffled(Step(tasks=tuple(TASKS[k] for k in order), losses=losses[list(order)], index=index, seed=3)).weights
        torch.testing.assert_close(b, a[list(order)], rtol=1e-12, atol=0)
        if index % 4 == 3:  # DWA's rates come from epoch means
            means = dict(zip(TASKS, (torch.rand(len(TASKS), generator=g) + 0.1).tolist(), strict=True))
            for m in (ordered, shuffled):
                m.on_epoch_end(index // 4, means)
    for key, value in ordered.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(shuffled.state_dict()[key], value, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["uncertainty"])
def test_loss_methods_fast_path_equals_general_path(name):
    fast, general = get_method(name), _general(get_method(name))
    for method in (fast, general):
        method.setup(TASKS)
    g = torch.Generator().manual_seed(0)
    for index in range(12):
        losses = torch.rand(len(TASKS), generator=g, dtype=torch.float64) + 0.05
        updates = [m(Step(tasks=TASKS, losses=losses, index=index, seed=3)) for m in (fast, general)]
        assert torch.equal(updates[0].weights, updates[1].weights), (name, index)
        if updates[0].penalty is not None:  # uncertainty: the same values and the same gradients
            assert torch.equal(updates[0].penalty, updates[1].penalty)
            grads = [torch.autograd.grad(u.weights.sum() + u.penalty, m.log_vars)[0]
                     for u, m in zip(updates, (fast, general), strict=True)]
            assert torch.equal(grads[0], grads[1])
        if index % 4 == 3:  # DWA's rates come from epoch means
            means = dict(zip(TASKS, (torch.rand(len(TASKS), generator=g) + 0.1).tolist(), strict=True))
            for m in (fast, general):
                m.on_epoch_end(index // 4, means)
    for key, value in fast.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, general.state_dict()[key]), key


def test_index_cache_follows_the_active_tasks():
    method = get_method("famo")
    method.setup(TASKS)
    losses = torch.ones(2, dtype=torch.float64)
    assert method.index(Step(tasks=("b", "d"), losses=losses)).tolist() == [1, 3]
    assert method.index(Step(tasks=("d", "a"), losses=losses)).tolist() == [3, 0]
    assert not method.all_active(Step(tasks=("d", "a"), losses=losses))
    assert method.all_active(Step(tasks=TASKS, losses=torch.ones(4, dtype=torch.float64)))


@pytest.mark.parametrize("kind", ["random", "ties", "saturated"])
def test_auroc_equals_torchmetrics_bit_for_bit(kind):
    g = torch.Generator().manual_seed({"random": 0, "ties": 1, "saturated": 2}[kind])
    for n in (2, 17, 1000, 40_000):
        scores = torch.rand(n, generator=g)
        if kind == "ties":
            scores = (scores * 10).round() / 10
        elif kind == "saturated":  # float32 sigmoids of large logits: long runs of exact 0 and 1
            scores = torch.sigmoid(torch.randn(n, generator=g) * 40)
        labels = (torch.rand(n, generator=g) < 0.3).long()
        labels[0], labels[-1] = 0, 1
        ours, theirs = BinaryAUROC(), classification.BinaryAUROC()
        for metric in (ours, theirs):
            metric.update(scores[: n // 2], labels[: n // 2])
            metric.update(scores[n // 2:], labels[n // 2:])
        assert torch.equal(ours.compute(), theirs.compute()), (kind, n)


def _batches(n_batches: int = 9):
    g = torch.Generator().manual_seed(5)
    for i in range(n_batches):
        rows = 7 + 5 * i
        outputs = {"bin": torch.randn(rows, generator=g) * 3, "reg": torch.randn(rows, generator=g)}
        targets = {"bin": (torch.rand(rows, generator=g) < 0.4).float(), "reg": torch.randn(rows, generator=g)}
        mask = torch.rand(rows, generator=g) < 0.8
        mask[0] = True
        losses = {t: (outputs[t] - targets[t]).pow(2)[mask if t == "bin" else slice(None)].mean() for t in outputs}
        yield outputs, targets, {"bin": mask}, losses


def test_tracker_loss_mean_is_the_per_batch_product_sum():
    tasks = [Task("bin", kind="binary"), Task("reg", kind="regression")]
    tracker = TaskMetrics(tasks)
    products = {"bin": [], "reg": []}
    rows = {"bin": 0, "reg": 0}
    for outputs, targets, masks, losses in _batches():
        tracker.update(outputs, targets, masks, losses)
        for t in products:  # what the tracker computed before: Lᵢ·nᵢ at every step
            n = int(masks[t].sum()) if t in masks else len(targets[t])
            products[t].append(losses[t] * n)
            rows[t] += n
    computed = tracker.compute()
    for t in products:
        assert computed[t]["loss"] == float(torch.tensor([float(torch.stack(products[t]).sum()), rows[t]],
                                                         dtype=torch.float64)[0] / rows[t])


def test_tracker_resumes_mid_epoch_with_the_same_values():
    tasks = [Task("bin", kind="binary"), Task("reg", kind="regression")]
    whole, first = TaskMetrics(tasks), TaskMetrics(tasks)
    batches = list(_batches())
    for i, (outputs, targets, masks, losses) in enumerate(batches):
        if i == 4:  # the uninterrupted run checkpoints there too (a checkpoint flushes the buffers)
            whole.state_dict()
        whole.update(outputs, targets, masks, losses)
        if i < 4:
            first.update(outputs, targets, masks, losses)
    resumed = TaskMetrics(tasks)
    resumed.load_state_dict(first.state_dict())
    for outputs, targets, masks, losses in batches[4:]:
        resumed.update(outputs, targets, masks, losses)
    assert resumed.compute() == whole.compute()


def test_health_total_norm_is_get_total_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 50), nn.ReLU(), nn.Linear(50, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 7
    monitor = GradientMonitor(model, HealthOptions())
    grads = [p.grad for p in model.parameters()]
    reference = float(torch.nn.utils.get_total_norm(grads, foreach=True))
    # one group on the CPU: the float64 hypot of the float32 per-tensor norms, to float32 round-off
    exact = math.hypot(*(float(n) for n in torch._foreach_norm(grads)))
    assert monitor._total_norm(grads) == exact
    assert monitor._total_norm(grads) == pytest.approx(reference, rel=1e-6)
    mixed = [grads[0].double(), *grads[1:]]  # two dtypes: the grouped computation, bit for bit
    assert monitor._total_norm(mixed) == float(torch.nn.utils.get_total_norm(mixed, foreach=True))
    for bad in (float("inf"), float("nan")):  # a non-finite gradient gives a non-finite total
        broken = [g.clone() for g in grads]
        broken[1][0] = bad
        assert not math.isfinite(monitor._total_norm(broken))
    # finite entries whose float32 sum of squares overflows: non-finite, as get_total_norm says
    huge = [torch.full((4,), 1.5e19), torch.full((3,), 1e18)]
    assert math.isinf(float(torch.nn.utils.get_total_norm(huge, foreach=True)))
    assert math.isinf(monitor._total_norm(huge))
    assert monitor._total_norm([g.double() for g in huge]) == pytest.approx(math.hypot(*[1.5e19] * 4, *[1e18] * 3))


def _cagrad_dual(j: torch.Tensor, radius: float) -> float:
    """min over the simplex of wᵀJg₀ + r‖Jᵀw‖ (Liu et al.'s dual; by strong duality the optimum of
    max_d minᵢ gᵢᵀd s.t. ‖d − g₀‖ ≤ r), by SLSQP from every vertex, the centre and the midpoint of
    the opposed pair; any w gives an upper bound, so the least is the tightest."""
    import numpy as np
    from scipy.optimize import minimize

    a = j.numpy()
    b = a @ a.mean(0)
    n = len(a)

    def f(w: np.ndarray) -> float:
        return float(w @ b + radius * np.linalg.norm(a.T @ w))

    def gradient(w: np.ndarray) -> np.ndarray:
        d = a.T @ w
        norm = np.linalg.norm(d)
        return b + (radius * (a @ d) / norm if norm > 0 else 0.0)

    starts = [*np.eye(n), np.full(n, 1 / n), np.r_[0.5, 0.5, np.zeros(n - 2)]]
    best = min(f(w) for w in starts)
    for w0 in starts:
        res = minimize(f, w0, jac=gradient, method="SLSQP", bounds=[(0, 1)] * n, tol=1e-13,
                       constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1}])
        if res.success:
            best = min(best, f(np.clip(res.x, 0, None) / np.clip(res.x, 0, None).sum()))
    return best


def test_cagrad_reaches_the_optimum_at_exactly_opposed_gradients():
    """With g₂ = −g₁ the problem is degenerate; the solver must still reach the optimum of
    max_d minᵢ gᵢᵀd s.t. ‖d − g₀‖ ≤ c‖g₀‖ (checked against the dual), not fall back to g₀."""
    method = get_method("cagrad", rescale=0)
    g = torch.Generator().manual_seed(0)
    for trial in range(24):
        n_tasks, dim = (3, 4, 6)[trial % 3], (9, 4, 18, 30)[trial % 4]
        j = torch.randn(n_tasks, dim, generator=g, dtype=torch.float64) * torch.rand(n_tasks, 1, generator=g,
                                                                                      dtype=torch.float64) * 10
        j[1] = -j[0]
        tasks = tuple(f"t{i}" for i in range(n_tasks))
        w = method(Step(tasks=tasks, losses=torch.ones(n_tasks, dtype=torch.float64), gramian=j @ j.T)).weights
        d, mean = w @ j, j.mean(0)
        radius = 0.4 * float(mean.norm())
        scale = float((j @ j.T).diagonal().mean())
        assert float((d - mean).norm()) <= radius * (1 + 1e-6), trial
        assert float((j @ d).min()) >= _cagrad_dual(j, radius) - 1e-6 * scale, trial


def test_bench_small_rows_and_command(capsys):
    from polytask.bench import small
    from polytask.cli.main import main
    from polytask.core.errors import InvalidParameterError

    rows = {r.method: r for r in small.measure_tiny(["mgda", "rlw"], rounds=1, block=1)}
    ew, jac = rows["(equal: 1 backward)"].ms, rows["(task Jacobian alone)"].ms
    assert rows["mgda"].vs_reference == pytest.approx(rows["mgda"].ms / jac)
    assert rows["rlw"].vs_reference == pytest.approx(rows["rlw"].ms / ew)
    update = rows["(hand-written update)"]  # the passes made into an update by hand, without a method
    assert update.vs_jacobian == pytest.approx(update.ms / jac) and update.goal == small.GOALS["gramian"]
    with pytest.raises(InvalidParameterError, match="unknown"):
        small.measure_tiny(["no_such_method"], rounds=1, block=1)
    assert main(["bench", "small", "--methods", "pcgrad", "--rounds", "1", "--block", "1", "--repeats", "0",
                 "--clock", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "cpu clock" in out and any(line.startswith("pcgrad ") for line in out.splitlines())


@pytest.mark.parametrize(("device", "clock", "match"), [
    ("tpu", "wall", "must be 'cpu', 'cuda' or 'cuda:N'; found 'tpu'"),
    ("gpu0", "wall", "must be 'cpu', 'cuda' or 'cuda:N'; found 'gpu0'"),
    ("cuda", "cpu", "CUDA is not available here" if not torch.cuda.is_available() else "use --clock wall")])
def test_bench_small_device_is_checked_before_anything_is_timed(device, clock, match):
    from polytask.bench import small
    from polytask.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match=match):
        small.run_routes(device=device, clock=clock, echo=lambda line: None)


def test_interleaved_rotates_the_order_and_times_every_step():
    """Each round starts one variant later (the variant timed first was slower whichever it was);
    every variant runs its warm-up and rounds × block steps, and gets one median per variant."""
    from polytask.bench.small import interleaved

    order: list[str] = []
    calls = {"a": 0, "b": 0, "c": 0}

    def make(name):
        def step(i):
            calls[name] += 1
            order.append(name)
        return step
    ms = interleaved({n: make(n) for n in "abc"}, rounds=3, block=2)
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())
    assert calls == {"a": 6 + 6, "b": 6 + 6, "c": 6 + 6}  # warm-up max(block, 6), then 3 rounds of 2
    timed = order[18:][::2]  # the first step of each block
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]


@pytest.mark.parametrize("name", ["famo", "dwa"])
def test_host_state_stays_on_the_host_in_float64(name):
    method = get_method(name)
    method.setup(TASKS)
    method.to(torch.float32)
    method.to("meta")  # any other device: the state stays where its arithmetic runs
    assert {(b.device.type, b.dtype) for b in method.buffers()} <= {("cpu", torch.float64), ("cpu", torch.long)}
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        weights = method(Step(tasks=TASKS, losses=torch.full((4,), 0.5, dtype=dtype))).weights
        assert weights.dtype == dtype and weights.shape == (4,) and bool(torch.isfinite(weights).all())


def test_nash_mtl_state_stays_on_the_host_where_its_solver_runs():
    """Nash-MTL solves on a float64 CPU Gramian: its cached weights and active-task mask stay on
    the host when the method is moved (to CUDA, found on a GPU: the mask moved there and met the
    host's), and the weights come back on the step's device and dtype."""
    method = get_method("nash_mtl", update_weights_every=2)
    method.setup(TASKS)
    method.to("meta")  # any other device
    assert {b.device.type for b in method.buffers()} == {"cpu"}
    j = torch.randn(4, 9, generator=torch.Generator().manual_seed(0))
    for index, tasks in enumerate((TASKS, TASKS, TASKS[:3], TASKS[:3])):
        rows = j[:len(tasks)]
        update = method(Step(tasks=tasks, losses=torch.ones(len(tasks)), index=index, seed=0, gramian=rows @ rows.T))
        assert update.weights.dtype == torch.float32 and bool((update.weights > 0).all())
    assert int(method.calls) == 4 and method.last_active.tolist() == [True, True, True, False]


@pytest.mark.parametrize("name", ["equal", "uncertainty", "famo"])
def test_engine_loss_step_is_the_weighted_sum_backward(name):
    """The engine's loss-weighting step gives, bit for bit, the gradients of w·L (+ the penalty)."""
    from polytask.engine.backward import Engine

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh())
    heads = nn.ModuleList(nn.Linear(8, 1) for _ in TASKS)
    x = torch.randn(16, 3)
    engine, twin = Engine(get_method(name), model.parameters()), get_method(name)
    twin.setup(TASKS)
    for index in range(3):
        z = model(x)
        losses = {t: h(z).pow(2).mean() for t, h in zip(TASKS, heads, strict=True)}
        for p in [*model.parameters(), *heads.parameters()]:
            p.grad = None
        report = engine.backward(losses)
        got = [p.grad.clone() for p in [*model.parameters(), *heads.parameters()]]
        z = model(x)
        vec = torch.stack([h(z).pow(2).mean() for h in heads])
        update = twin(Step(tasks=TASKS, losses=vec.detach(), index=index))
        total = torch.dot(update.weights.to(vec.dtype), vec)
        total = total if update.penalty is None else total + update.penalty
        expected = torch.autograd.grad(total, [*model.parameters(), *heads.parameters()])
        assert all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)), (name, index)
        assert report.weights == dict(zip(TASKS, update.weights.tolist(), strict=True))


def test_constant_weights_methods_answer_by_task_names_alone():
    """A method that declares ``constant_weights`` (the engine asks it once per task set) gives the
    same weights whatever the step's losses, index and epoch; the engine keeps one answer per task
    set, so a step without one task gets that set's weights, not the full set's."""
    from polytask.engine.backward import Engine
    from polytask.methods.base import METHODS

    constant = [name for name in METHODS.names() if METHODS.get(name).constant_weights]
    assert "equal" in constant
    for name in constant:
        method = METHODS.create(name)
        method.setup(TASKS)
        first = method(Step(tasks=TASKS, losses=torch.tensor([0.1, 2.0, 3.0, 4.0]), index=0)).weights
        later = method(Step(tasks=TASKS, losses=torch.tensor([9.0, 0.5, 1e-3, 7.0]), index=57, epoch=3)).weights
        assert torch.equal(first, later), name

    class Counting(METHODS.get("equal")):  # a subclass makes no promise about its own weights
        calls = 0

        def weights(self, step):
            Counting.calls += 1
            return torch.ones_like(step.losses)

    assert not Counting.constant_weights
    patched = get_method("equal")
    patched.weights = Counting.weights.__get__(patched)  # an instance's own weights: asked every step
    for method in (Counting(), patched):
        counted = Engine(method, [torch.ones(1, requires_grad=True)])
        before = Counting.calls
        for _ in range(3):
            counted.backward({t: counted.theta[0].sum() * (i + 1) for i, t in enumerate(TASKS)})
        assert Counting.calls == before + 3
    w = torch.ones(2, requires_grad=True)
    engine = Engine(get_method("equal"), [w])
    for losses in ({t: (w * (i + 1)).sum() for i, t in enumerate(TASKS)},
                   {t: None if t == TASKS[1] else (w * (i + 1)).sum() for i, t in enumerate(TASKS)}):
        w.grad = None
        report = engine.backward(losses)
        present = [i + 1 for i, t in enumerate(TASKS) if losses[t] is not None]
        assert torch.equal(w.grad, torch.full((2,), float(sum(present))))
        assert report.weights == {t: 0.0 if losses[t] is None else 1.0 for t in TASKS}


def test_dwa_answer_is_reused_until_its_state_changes():
    """DWA's weights change only at epoch ends: the engine asks it again only when its
    ``weights_key`` changes (an epoch end, a loaded state), and every step's gradients and weights
    are those of an engine that asks it every step. A subclass that overrides ``weights`` without
    declaring its own ``weights_key`` is asked every step."""
    from polytask.engine.backward import Engine
    from polytask.methods.dwa import DWA

    class Counting(DWA):
        calls = 0

        def weights(self, step):
            type(self).calls += 1
            return super().weights(step)

        weights_key = DWA.weights_key  # the same promise about its own weights

    class Undeclared(DWA):
        calls = 0

        def weights(self, step):
            type(self).calls += 1
            return super().weights(step)

    asked = get_method("dwa")
    asked.weights_key = lambda tasks: None  # an instance's own weights_key: asked every step
    w = torch.ones(3, requires_grad=True)
    engines = [Engine(m, [w]) for m in (Counting(), Undeclared(), asked)]
    for engine in engines:
        engine.method.setup(TASKS)
    g = torch.Generator().manual_seed(0)
    for epoch in range(4):
        for _ in range(3):
            scales = (torch.rand(len(TASKS), generator=g) + 0.1).tolist()
            seen = []
            for engine in engines:
                w.grad = None
                report = engine.backward({t: (w * c).sum() for t, c in zip(TASKS, scales, strict=True)}, epoch=epoch)
                seen.append((report.weights, w.grad.clone()))
            for weights, grad in seen[:2]:
                assert weights == seen[2][0] and torch.equal(grad, seen[2][1])
        means = dict(zip(TASKS, (torch.rand(len(TASKS), generator=g) + 0.5).tolist(), strict=True))
        for engine in engines:
            engine.method.on_epoch_end(epoch, means)
    assert Counting.calls == 4 and Undeclared.calls == 12  # once an epoch; every step
    engines[0].method.load_state_dict(asked.state_dict())  # copied in place: the key changes
    engines[0].backward({t: w.sum() for t in TASKS}, epoch=4)
    assert Counting.calls == 5


def _keyed_methods() -> list[str]:
    from polytask.engine.backward import _spoken
    from polytask.methods.base import METHODS

    return [name for name in METHODS.names() if _spoken(METHODS.get(name))[0]]


@pytest.mark.parametrize("name", _keyed_methods())
def test_methods_with_a_weights_key_give_the_weights_of_every_step(name):
    """Every method with a ``weights_key``, reused by the engine, gives at every step the weights of
    the same method asked every step — across epoch ends, a task left out and a new setup with
    other sizes."""
    from polytask.engine.backward import Engine

    assert {"dwa", "static", "inverse_size"} <= set(_keyed_methods())
    w = torch.ones(2, requires_grad=True)
    methods = [get_method(name), get_method(name)]
    methods[1].weights_key = lambda tasks: None  # asked every step
    engines = [Engine(m, [w]) for m in methods]
    g = torch.Generator().manual_seed(1)
    for epoch in range(3):
        sizes = {t: 10 * (i + 3) ** (epoch // 2 + 1) for i, t in enumerate(TASKS)}
        if epoch in (0, 2):  # set up again with other sizes and a configured weight
            for m in methods:
                m.setup(TASKS, sizes=sizes, static_weights={TASKS[0]: 2.5 + epoch})
        for index in range(3):
            scales = (torch.rand(len(TASKS), generator=g) + 0.1).tolist()
            seen = []
            for engine in engines:
                w.grad = None
                losses = {t: None if index == 1 and t == TASKS[2] else (w * c).sum()
                          for t, c in zip(TASKS, scales, strict=True)}
                seen.append((engine.backward(losses, epoch=epoch).weights, w.grad.clone()))
            assert seen[0][0] == seen[1][0] and torch.equal(seen[0][1], seen[1][1]), (name, epoch, index)
        means = dict(zip(TASKS, (torch.rand(len(TASKS), generator=g) + 0.5).tolist(), strict=True))
        for m in methods:
            m.on_epoch_end(epoch, means)


def test_route_sweep_reports_both_routes_and_what_auto_takes(monkeypatch):
    """The sweep times mgda on each route of each MLP shape and reads the route `gramian: auto`
    takes there: J below SMALL_JACOBIAN entries, the no-J Gramian from it (Linear layers)."""
    import importlib

    from polytask.bench import small

    engine_backward = importlib.import_module("polytask.engine.backward")  # the module, not its function
    shapes = [(4, 8, 2, 4), (8, 16, 3, 4)]
    entries = [2 * (4 * 8 + 8 + 8 * 8 + 8), 3 * (8 * 16 + 16 + 16 * 16 + 16)]
    monkeypatch.setattr(engine_backward, "SMALL_JACOBIAN", entries[1])
    rows = small.measure_routes(shapes, rounds=1, block=1)
    assert [r.jacobian_entries for r in rows] == entries
    assert [r.auto for r in rows] == ["jacobian", "autogram"]
    assert all(r.floor_ms > 0 and r.jacobian > 0 and r.autogram > 0 for r in rows)
    lines: list[str] = []
    monkeypatch.setattr(small, "ROUTE_SHAPES", tuple(shapes))
    monkeypatch.setattr(small, "measure_routes", lambda *args, **kw: rows)  # the table of the rows just measured
    small.run_routes(echo=lines.append)
    assert "auto takes" in lines[1] and lines[2].split()[-1] == "jacobian" and lines[3].split()[-1] == "autogram"


def test_bench_small_hand_written_update_is_the_engines_update():
    """`bench small`'s `(hand-written update)` row writes the update an engine step writes for a
    Gramian method whose weights are all 1 (heads unweighted): it is a fair reference."""
    from polytask.bench import small
    from polytask.engine.backward import Engine
    from polytask.methods.base import Method

    class Ones(Method):
        needs = "gramian"

        def weights(self, step):
            return torch.ones(len(step.tasks), dtype=step.gramian.dtype)

    hand, ours = small.tiny_problem(), small.tiny_problem()
    small.update_step(hand)(0)
    engine = Engine(Ones(), ours.model.shared_parameters(), compare="shared", heads="unweighted",
                    params=ours.model.parameters())
    ours.model.zero_grad(set_to_none=True)
    engine.backward(ours.losses()[1])
    for (name, a), b in zip(hand.model.named_parameters(), ours.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)


def _hosted_methods() -> list[str]:
    from polytask.engine.backward import _spoken
    from polytask.methods.base import METHODS

    return [name for name in METHODS.names() if _spoken(METHODS.get(name))[1]]


@pytest.mark.parametrize("name", _hosted_methods())
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_host_update_gives_the_gradients_of_the_differentiable_update(name, scale):
    """A method with a ``host_update`` (uncertainty), taken by the engine, gives θ and the method's
    own parameters the gradients of the backward of its differentiable ``update`` (to rounding),
    over steps that move its parameters, leave a task out and reorder the tasks."""
    from polytask.engine.backward import Engine

    assert "uncertainty" in _hosted_methods()
    theta = torch.linspace(-1.0, 1.0, 6, requires_grad=True)
    methods = [get_method(name), get_method(name)]
    methods[1].host_update = lambda step: None  # patched: the engine takes update()
    for m in methods:
        m.setup(TASKS)
    engines = [Engine(m, [theta]) for m in methods]
    g = torch.Generator().manual_seed(4)
    for index in range(6):
        scales = (torch.rand(len(TASKS), generator=g) + 0.1).tolist()
        for m in methods:  # the same parameters, moved as an optimiser would
            for p in m.parameters():
                p.data = torch.randn(p.shape, generator=torch.Generator().manual_seed(index))
        seen = []
        for engine, m in zip(engines, methods, strict=True):
            theta.grad = None
            for p in m.parameters():  # one parameter gradient set already: the step's is added to it
                p.grad = torch.full_like(p, 0.25) if index % 2 else None
            order = TASKS[::-1] if index == 3 else TASKS
            losses = {t: None if index == 2 and t == TASKS[1] else (theta ** 2 * c).sum()
                      for t, c in zip(order, scales, strict=True)}
            report = engine.backward(losses, scale=scale)
            seen.append((report.weights, theta.grad.clone(), [p.grad.clone() for p in m.parameters()]))
        (w_host, d_host, own_host), (w_auto, d_auto, own_auto) = seen
        assert w_host.keys() == w_auto.keys()
        for t in w_host:
            assert w_host[t] == pytest.approx(w_auto[t], rel=1e-6, abs=1e-7), (index, t)
        torch.testing.assert_close(d_host, d_auto, rtol=1e-6, atol=1e-6)
        for a, b in zip(own_host, own_auto, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_host_update_leaves_frozen_method_parameters_alone():
    from polytask.engine.backward import Engine

    theta = torch.ones(3, requires_grad=True)
    method = get_method("uncertainty")
    method.setup(TASKS)
    method.log_vars.requires_grad_(False)
    Engine(method, [theta]).backward({t: (theta * (i + 1)).sum() for i, t in enumerate(TASKS)})
    assert method.log_vars.grad is None
    torch.testing.assert_close(theta.grad, torch.full((3,), 0.5 * (1 + 2 + 3 + 4)))


def test_accumulate_seeded_is_autograd_backward_of_the_seeds():
    from polytask.engine.passes import accumulate_seeded

    x = torch.tensor([1.0, 2.0], requires_grad=True)
    leaf = torch.zeros(2, requires_grad=True)
    losses = torch.stack([(x ** 2).sum(), x.prod()])
    accumulate_seeded((losses, leaf), (torch.tensor([0.5, 3.0]), torch.tensor([1.0, -1.0])))
    torch.testing.assert_close(x.grad, 0.5 * 2 * x.detach() + 3.0 * torch.tensor([2.0, 1.0]))
    assert torch.equal(leaf.grad, torch.tensor([1.0, -1.0]))
    accumulate_seeded((leaf,), (torch.tensor([1.0, 1.0]),))  # a leaf's gradient is added to
    assert torch.equal(leaf.grad, torch.tensor([2.0, 0.0]))
    with pytest.raises(ValueError, match="constant seeds"):
        accumulate_seeded((leaf,), (torch.ones(2, requires_grad=True),))


@pytest.mark.parametrize("name", ["equal", "rlw", "famo", "static"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_loss_step_seeded_backward_is_that_of_the_weighted_sum_bit_for_bit(name, scale):
    """The engine's loss step seeds the losses' backward with the weights: θ gets exactly what the
    backward of (Σ wᵢ Lᵢ) · scale gives, with w the step's weights."""
    from polytask.engine.backward import Engine

    theta = torch.linspace(-1.0, 2.0, 7, requires_grad=True)
    engine = Engine(name, [theta])
    for index in range(3):
        def losses(offset=1.5 + index):
            return {t: (theta.sin() * (i + offset)).sum() ** 2 for i, t in enumerate(TASKS)}

        theta.grad = None
        report = engine.backward(losses(), scale=scale)
        got = theta.grad.clone()
        theta.grad = None
        w = torch.tensor([report.weights[t] for t in TASKS])
        (torch.dot(w, torch.stack(list(losses().values()))) * scale).backward()
        assert torch.equal(got, theta.grad), (name, index)


def _famo_run(method, steps: int, seed: int = 0) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for index in range(steps):
        losses = torch.rand(len(TASKS), generator=g, dtype=torch.float64) + 0.05
        out.append(method(Step(tasks=TASKS, losses=losses, index=index)).weights.tolist())
    return out


def test_packed_host_buffers_read_and_write_as_the_separate_buffers():
    """FAMO's five host buffers are rows of one table: the same weights and state as buffers read and
    written one by one (a method whose buffers were replaced), through a state-dict round trip into
    a fresh method, a deep copy, an assigned buffer and one given new memory."""
    import copy

    packed, separate = get_method("famo"), get_method("famo")
    for m in (packed, separate):
        m.setup(TASKS)
    assert packed._packed() is not None
    separate.logits = separate.logits.clone()  # replaced: no longer a row of the table
    assert separate._packed() is None
    assert _famo_run(packed, 6) == _famo_run(separate, 6)
    state = packed.state_dict()
    assert set(state) == {"logits", "exp_avg", "exp_avg_sq", "adam_steps", "previous_losses", "_extra_state"}
    for key, value in separate.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(state[key], value), key
    fresh = get_method("famo")
    fresh.load_state_dict(state)
    assert fresh._packed() is not None  # packed again after the load
    twin = copy.deepcopy(packed)
    moved = get_method("famo")
    moved.setup(TASKS)
    kept = moved.logits
    moved.load_state_dict(state)
    assert moved.logits is kept and moved._packed() is not None  # a packed method's rows are copied into
    moved.exp_avg.data = moved.exp_avg.clone()  # new memory under the same tensor
    assert moved._packed() is None
    runs = [_famo_run(m, 5, seed=1) for m in (fresh, twin, moved, separate)]
    assert runs[0] == runs[1] == runs[2] == runs[3]
    for m in (fresh, twin, moved):
        for key, value in separate.state_dict().items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(m.state_dict()[key], value), key


def test_step_losses_only_is_the_dataclass_step():
    """The loss step's shortcut builds the same object as ``Step(...)`` with those fields."""
    import dataclasses

    losses = torch.rand(3)
    quick = Step.losses_only(("a", "b", "c"), losses, 7, 11, 2)
    full = Step(tasks=("a", "b", "c"), losses=losses, index=7, seed=11, epoch=2)
    assert vars(quick) == vars(full)
    assert {f.name for f in dataclasses.fields(Step)} <= {k.lstrip("_") for k in vars(quick)}
    assert not quick.has_generator and not quick.has_gramian
    assert torch.equal(torch.rand(4, generator=quick.generator), torch.rand(4, generator=full.generator))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("log_var", [-800.0, -709.78, -709.5, -100.0, 800.0, math.nan, -math.inf, math.inf])
def test_uncertainty_host_update_at_extreme_log_variances_is_update(log_var, dtype):
    """Past e^x's float range the host path gives the weights torch's exp gives (inf, or 0), no
    error; a NaN log-variance gives a NaN weight (it gave inf)."""
    losses = torch.tensor([1.0, 2.0], dtype=dtype)
    method = get_method("uncertainty")
    method.setup(("a", "b"))
    method.log_vars.data = torch.tensor([log_var, 0.0])
    method.to(dtype)
    step = Step(tasks=("a", "b"), losses=losses)
    # float64: e^(log ½ − s) against ½e^(−s), the rounding of the exponent's argument grows with |s|
    torch.testing.assert_close(method.host_update(step).weights, method.update(step).weights.detach(),
                               rtol=1e-13 if dtype == torch.float64 else 0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("dtype", "scale"), [(torch.float64, 1.0), (torch.float64, 3.0), (torch.float16, 1.0),
                                              (torch.float16, 32768.0), (torch.float16, 65536.0),
                                              (torch.bfloat16, 65536.0)])
def test_uncertainty_host_update_is_update_in_every_loss_dtype(dtype, scale):
    """Losses in float64 or half precision, under a loss scale: the host path and ``update``'s
    backward give the same weights and gradients. ``update`` worked in the log-variances' float32
    (float64 weights 1e-8 off) and in float16 where the losses were (its log-variance gradient
    overflowed to NaN under a loss scale of 65 536, -inf at 32 768, where the host path's is finite)."""
    from polytask.engine.backward import Engine

    grads = []
    for host in (True, False):
        theta = nn.Parameter(torch.tensor([0.7, -1.3]))
        method = get_method("uncertainty")
        if not host:
            method.host_update = lambda step: None  # patched: the engine takes update()
        method.setup(("a", "b"))
        method.log_vars.data = torch.tensor([0.3, -1.7])
        report = Engine(method, [theta]).backward({"a": (theta[0] ** 2).to(dtype), "b": (2.0 * theta[1]).to(dtype)},
                                                   scale=scale)
        grads.append((report.weights, theta.grad, method.log_vars.grad))
    (w_host, theta_host, s_host), (w_update, theta_update, s_update) = grads
    tolerance = {"rtol": 1e-15, "atol": 0} if dtype == torch.float64 else {"rtol": 0, "atol": 0}
    for t in ("a", "b"):
        torch.testing.assert_close(torch.tensor(w_host[t], dtype=torch.float64),
                                   torch.tensor(w_update[t], dtype=torch.float64), **tolerance)
    torch.testing.assert_close(theta_host, theta_update, rtol=1e-6, atol=0)  # inf where the true value overflows
    torch.testing.assert_close(s_host, s_update, rtol=1e-6, atol=1e-7)
    assert torch.isfinite(s_host).all()


def test_uncertainty_in_float64_has_float64_weights():
    """``method.double()`` derives log(scale) again in float64 (it kept float32's rounding of log ½)."""
    method = get_method("uncertainty")
    method.setup(("a", "b"))
    method.double()
    step = Step(tasks=("a", "b"), losses=torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert method.update(step).weights.tolist() == [0.5, 0.5]
    assert method.host_update(step).weights.tolist() == [0.5, 0.5]


@pytest.mark.parametrize("name", ["equal", "static", "dwa", "rlw", "famo", "uncertainty", "db_mtl"])
def test_a_loss_that_is_a_leaf_keeps_a_gradient_of_its_own(name):
    """The loss step seeds the losses' backward with the weights, and a loss that is a leaf (or a view
    of one) takes its row of the seed as its ``.grad``. That seed must be the step's own tensor:
    zeroing the gradient in place (``zero_grad(set_to_none=False)``) and accumulating into it must
    not write into weights the engine or the method keeps (a cached seed did: every later step's
    gradient of that task was then 0)."""
    from polytask.engine.backward import Engine

    a = nn.Parameter(torch.tensor(2.0))
    b = nn.Parameter(torch.tensor([3.0]))
    c = nn.Parameter(torch.tensor(1.5))
    engine = Engine(name, [a, b, c])
    for index in range(70):  # past RLW's block of 64 steps
        report = engine.backward({"a": a, "b": b.view(()), "c": c * 2.0})
        assert a.grad.item() == pytest.approx(report.weights["a"], rel=1e-6), index
        assert b.grad.item() == pytest.approx(report.weights["b"], rel=1e-6), index
        assert c.grad.item() == pytest.approx(2.0 * report.weights["c"], rel=1e-6), index
        for p in (a, b, c):
            p.grad.zero_()


@pytest.mark.parametrize("name", _hosted_methods())
def test_host_update_values_are_its_weights(name):
    """What ``host_update`` hands the engine as floats (which it then reports) is its weights' values,
    over steps with every task, a subset and another order."""
    method = get_method(name)
    method.setup(TASKS)
    g = torch.Generator().manual_seed(2)
    for index in range(8):
        tasks = TASKS if index % 3 else (TASKS[2], TASKS[0])
        for dtype in (torch.float32, torch.float64):
            step = Step(tasks=tasks, losses=torch.rand(len(tasks), generator=g, dtype=dtype) + 0.1, index=index)
            hosted = method.host_update(step)
            if hosted is None:
                continue
            assert hosted.weights.dtype == dtype and not hosted.weights.requires_grad
            if hosted.values is not None:
                assert list(hosted.values) == hosted.weights.tolist(), (index, dtype)


def test_rlw_host_update_is_its_weights_over_a_block():
    """RLW's block tensors give the weights of ``weights`` on every step of a block and past its end,
    each step a tensor of its own; a step with some tasks out, or with its own generator, takes
    ``weights``."""
    method = get_method("rlw")
    method.setup(TASKS)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        kept = []  # all alive: no two share memory
        for index in (0, 1, 37, 37, 63, 64, 65, 200):
            step = Step(tasks=TASKS, losses=torch.ones(len(TASKS), dtype=dtype), index=index, seed=5)
            hosted = method.host_update(step)
            assert torch.equal(hosted.weights, method.weights(step)), (dtype, index)
            kept.append(hosted.weights)
        assert len({w.untyped_storage().data_ptr() for w in kept}) == len(kept)
    assert method.host_update(Step(tasks=TASKS[:2], losses=torch.ones(2), index=3)) is None
    assert method.host_update(Step(tasks=TASKS, losses=torch.ones(4), index=3,
                                   generator=torch.Generator().manual_seed(0))) is None


def test_engine_rejects_host_values_of_the_wrong_length():
    from polytask.core.errors import InvalidParameterError
    from polytask.engine.backward import Engine
    from polytask.methods.base import HostUpdate

    theta = torch.ones(2, requires_grad=True)
    method = get_method("rlw")
    method.setup(TASKS)
    engine = Engine(method, [theta])
    type(method).host_update, original = (lambda self, step: HostUpdate(torch.ones(len(step.tasks)), values=[1.0])), \
        type(method).host_update
    try:
        with pytest.raises(InvalidParameterError, match=r"returned weights of shape \(4,\) and 1 values; expected \(4,\)"):
            engine.backward({t: theta.sum() for t in TASKS})
    finally:
        type(method).host_update = original


@pytest.mark.parametrize("name", ["upgrad", "mgda"])
def test_a_pass_seed_adopted_by_a_leaf_is_not_the_next_pass_seed(name):
    """The accumulating passes of J's rows (one per task) seed each pass with ones of its own: a loss
    that is a view of a head's leaf takes its seed as that leaf's ``.grad``, and a later pass adding
    into it must not change what the passes after it are seeded with."""
    from polytask.engine.backward import Engine

    theta = nn.Parameter(torch.tensor([1.0, -2.0]))
    head = nn.Parameter(torch.tensor([0.5]))

    def losses(first):
        return {"a": first() + 0.0 * theta.sum(), "b": head.sum() * 3.0 + (theta ** 2).sum(),
                "c": (theta * torch.tensor([2.0, 1.0])).sum()}

    seen = []
    for first in (lambda: head.view(()), lambda: head.sum() * 1.0):  # a view of the leaf; a new tensor
        theta.grad = head.grad = None
        Engine(name, [theta], params=[theta, head]).backward(losses(first))
        seen.append((theta.grad.clone(), head.grad.clone()))
    for got, want in zip(*seen, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("jacobian", ["loop", "batched", "auto"])
@pytest.mark.parametrize("heads", ["unweighted", "weighted"])
def test_heads_that_one_pass_gives_the_same_tensor_get_their_own_gradients(jacobian, heads):
    """A loss h₁ + h₂ hands both leaves one gradient tensor. Where J is too large for the passes to
    accumulate into it (the loop route, its per-task gradients summed by the engine), each head must
    still get its own sum, in a tensor of its own (h₁: 1 + 3, h₂: 1 + 5 unweighted)."""
    from polytask.engine.backward import Engine
    from polytask.engine.jacobian import ACCUMULATE_MAX_ENTRIES

    theta = nn.Parameter(torch.linspace(-0.01, 0.01, ACCUMULATE_MAX_ENTRIES // 2))
    h1, h2 = nn.Parameter(torch.tensor(0.5)), nn.Parameter(torch.tensor(0.25))
    losses = {"a": h1 + h2 + (theta ** 2).sum(), "b": h1 * 3.0 + theta.sum(), "c": (theta * 2).sum() + h2 * 5.0}
    report = Engine("upgrad", [theta], params=[theta, h1, h2], heads=heads, jacobian=jacobian).backward(losses)
    w = report.weights if heads == "weighted" else dict.fromkeys(report.weights, 1.0)
    assert h1.grad.item() == pytest.approx(w["a"] + 3.0 * w["b"], rel=1e-6)
    assert h2.grad.item() == pytest.approx(w["a"] + 5.0 * w["c"], rel=1e-6)
    assert h1.grad.data_ptr() != h2.grad.data_ptr()


@pytest.mark.parametrize("jacobian", ["batched", "loop"])
@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad"])
def test_a_loss_scale_unscales_leaves_that_share_a_gradient_once(jacobian, name):
    """With a loss scale (a GradScaler's), the gradients of the scaled losses are unscaled before the
    method sees them. Where the model adds two parameters (z = θ₁ + θ₂, or θ₁ + a head's own
    parameter of its shape) one pass hands both the same gradient tensor, and the batched route's
    blocks of J were unscaled in place once per leaf: θ's gradient came out 1/scale too small. The
    update at scale 4 must be the update at scale 1, times 4."""
    from polytask.engine.backward import Engine

    results = []
    for scale in (1.0, 4.0):
        t1, t2 = nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([0.5, 0.25]))
        t3, own = nn.Parameter(torch.tensor([0.3, 0.7])), nn.Parameter(torch.tensor([0.1, -0.2]))
        z = t1 + t2  # each reached only through the sum: one gradient tensor for both
        losses = {"a": (z ** 2).sum(), "b": ((t3 + own) * torch.tensor([1.0, 3.0])).sum(),
                  "c": z.sum() * 2.0}  # t3 and the head own: one gradient tensor too
        Engine(name, [t1, t2, t3], params=[t1, t2, t3, own], jacobian=jacobian).backward(losses, scale=scale)
        results.append(torch.cat([t1.grad, t2.grad, t3.grad, own.grad]) / scale)
    torch.testing.assert_close(results[1], results[0])
