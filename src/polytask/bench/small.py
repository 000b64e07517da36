"""`polytask bench small`: what a method costs per step beyond the gradients on a tiny model, and
the Trainer's own cost over a hand-written loop.

The tiny model is the one of issue 18 (an RL or tabular user's network): an MLP 16 → 64 → 64
with T = 4 linear regression heads, batch 32. There a step's gradients cost a fraction of a
millisecond, so a method's fixed costs (its solver, dtype conversions, Python, allocations) are
what it adds. Each method is timed through :class:`~polytask.engine.backward.Engine` against its
own floor: a loss-weighting method against one plain backward of Σ Lᵢ (``×EW``), a Gramian or
Jacobian method against computing the task Jacobian alone (``×Jac``: T backward passes writing J)
and against T backward passes with the gradients discarded (``×floor``); the row
``(hand-written update)`` (:func:`update_step`) makes those passes into an update by hand, without
a method, for what a method and the engine add to it. Every variant is timed
in blocks of steps, the variants interleaved round after round (machine noise hits all alike),
and the median block is reported per step.
"""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polytask.bench.overhead import CLOCKS
from polytask.bench.speed import Problem, equal_step, floor_step, jacobian_step, method_step
from polytask.core.errors import InvalidParameterError
from polytask.core.task import Task
from polytask.engine.jacobian import _write_row
from polytask.methods.base import METHODS
from polytask.models.encoders import MLP
from polytask.models.hard_sharing import HardSharing

#: the methods issue 18 measures on the tiny model: Gramian methods, then loss-weighting methods
DEFAULT_METHODS: tuple[str, ...] = ("mgda", "upgrad", "pcgrad", "cagrad", "nash_mtl",
                                    "equal", "rlw", "uncertainty", "famo", "dwa")
#: goals of issue 18 on the tiny model: ratio to the method's reference (×EW or ×Jac)
GOALS = {"losses": 1.05, "gramian": 1.25, "jacobian": 1.25}


@dataclass(frozen=True)
class SmallRow:
    """One method on the tiny model: ms per step and its ratios to the references."""

    method: str
    needs: str
    ms: float
    vs_equal: float
    vs_jacobian: float
    vs_floor: float

    @property
    def vs_reference(self) -> float:
        """×EW for a loss-weighting method, ×Jac for a gradient method (the issue's goals)."""
        return self.vs_equal if self.needs == "losses" else self.vs_jacobian

    @property
    def goal(self) -> float:
        return GOALS[self.needs]


def tiny_problem(n_tasks: int = 4, batch_size: int = 32, seed: int = 0, device: str = "cpu") -> Problem:
    """The tiny model: MLP 16 → 64 → 64, ``n_tasks`` linear regression heads, a fixed batch."""
    return mlp_problem(16, 64, n_tasks, batch_size, seed, name="tiny", device=device)


def interleaved(steps: dict[str, Callable[[int], None]], *, rounds: int, block: int,
                now: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median ms per step of each callable, timed by ``now`` in blocks of ``block`` steps, round-robin.

    Each round starts one variant later than the one before, so that no variant always runs first
    (or always after the same one): with a fixed order the variant timed first was 10–15% slower
    on this machine whichever it was, the plain backward ×EW is measured against included. The
    garbage collector runs before each block, outside the clock, so that a collection triggered by
    one variant's allocations is not charged to the next."""
    for step in steps.values():  # first calls: thread pools, allocator growth, `jacobian: auto` trials
        for i in range(max(block, 6)):
            step(i)
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in steps}
    counter = 1000
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            step = steps[name]
            gc.collect()
            start = now()
            for _ in range(block):
                step(counter)
                counter += 1
            times[name].append((now() - start) * 1000 / block)
    return {name: statistics.median(values) for name, values in times.items()}


def update_step(problem: Problem) -> Callable[[int], None]:
    """The update a Gramian method's step makes, hand-written with torch's public calls and without
    the method: T passes (``torch.autograd.grad``) that also return the heads' gradients, J's rows,
    G = J Jᵀ, d = Jᵀw for fixed w = 1, θ's ``.grad`` from d and the heads' from their own passes.

    The "task Jacobian alone" reference writes no update at all; this row is what a user's own loop
    pays to turn the same passes into one, so a method's ratio to it is the method and the engine."""
    model = problem.model
    shared = list(model.shared_parameters())
    ids = {id(p) for p in shared}
    heads = [p for p in model.parameters() if id(p) not in ids]
    inputs, n, sizes = (*shared, *heads), len(shared), [p.numel() for p in shared]
    kept: list[Tensor] = []

    def step(i: int) -> None:
        model.zero_grad(set_to_none=True)
        _, losses = problem.losses()
        values = list(losses.values())
        if not kept:
            kept.append(torch.empty(len(values), sum(sizes), dtype=shared[0].dtype, device=shared[0].device))
            kept.append(torch.ones(len(values), dtype=shared[0].dtype, device=shared[0].device))
        jacobian, weights = kept
        head_grads = []
        for k, loss in enumerate(values):
            grads = torch.autograd.grad(loss, inputs, retain_graph=k < len(values) - 1, allow_unused=True)
            _write_row(jacobian[k], grads[:n], sizes)
            head_grads.append(grads[n:])
        torch.mm(jacobian, jacobian.T)  # G, what the method would read
        for p, part in zip(shared, (weights @ jacobian).split(sizes), strict=True):
            p.grad = part.view(p.shape)
        for grads in head_grads:
            for p, g in zip(heads, grads, strict=True):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
    return step


def measure_tiny(methods: Sequence[str] = DEFAULT_METHODS, *, rounds: int = 15, block: int = 20,
                 n_tasks: int = 4, batch_size: int = 32, clock: str = "wall", device: str = "cpu") -> list[SmallRow]:
    """Rows for every method on the tiny model (each method on its own copy of the same model)."""
    for name in methods:
        METHODS.get(name)  # unknown names fail before anything is timed
    reference = tiny_problem(n_tasks, batch_size, device=device)
    steps: dict[str, Callable[[int], None]] = {"(equal: 1 backward)": equal_step(reference),
                                               "(task Jacobian alone)": jacobian_step(reference),
                                               "(floor: T backwards)": floor_step(reference),
                                               "(hand-written update)": update_step(tiny_problem(n_tasks, batch_size,
                                                                                                device=device))}
    for name in methods:
        cls = METHODS.get(name)
        if cls.needs != "losses" and cls.compare == "features":
            continue  # the tiny model's goal is about the parameters' Jacobian
        steps[name] = method_step(tiny_problem(n_tasks, batch_size, device=device), name, cls.compare if cls.needs != "losses"
                                  else "auto", 1, gramian="auto")  # the route the engine takes by default
    ms = interleaved(steps, rounds=rounds, block=block, now=clock_on(clock, device))
    ew, jac, floor = ms["(equal: 1 backward)"], ms["(task Jacobian alone)"], ms["(floor: T backwards)"]
    rows = [SmallRow("(equal: 1 backward)", "losses", ew, 1.0, ew / jac, ew / floor),
            SmallRow("(task Jacobian alone)", "gramian", jac, jac / ew, 1.0, jac / floor),
            SmallRow("(floor: T backwards)", "gramian", floor, floor / ew, floor / jac, 1.0)]
    update = ms["(hand-written update)"]
    rows.append(SmallRow("(hand-written update)", "gramian", update, update / ew, update / jac, update / floor))
    for name in steps:
        if name in METHODS:
            value = ms[name]
            rows.append(SmallRow(name, METHODS.get(name).needs, value, value / ew, value / jac, value / floor))
    return rows


#: MLP shapes of the route sweep: (inputs, width of the two hidden layers, tasks, batch)
ROUTE_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (16, 64, 4, 32), (16, 64, 10, 32), (16, 128, 4, 256), (64, 256, 4, 64), (64, 256, 10, 256),
    (128, 512, 4, 64), (128, 512, 10, 128), (256, 1024, 4, 64))
#: further shapes the sweep takes on CUDA (5·10⁷ to 8·10⁸ entries of J), where a step's fixed costs
#: (kernel launches, synchronisations) are larger next to its arithmetic and the crossover lies further out
CUDA_ROUTE_SHAPES: tuple[tuple[int, int, int, int], ...] = (
    (512, 2048, 10, 256), (768, 3072, 10, 256), (1024, 4096, 10, 256), (1024, 4096, 40, 256))


@dataclass(frozen=True)
class RouteRow:
    """One MLP of the route sweep: the floor, and a Gramian method's step on each route (×floor)."""

    shape: tuple[int, int, int, int]
    jacobian_entries: int
    floor_ms: float
    jacobian: float
    autogram: float
    auto: str  # the route ``gramian: auto`` takes on this shape


def mlp_problem(inputs: int, width: int, n_tasks: int, batch_size: int, seed: int = 0, name: str = "mlp",
                device: str = "cpu") -> Problem:
    """A hard-shared MLP inputs → width → width with ``n_tasks`` linear regression heads."""
    torch.manual_seed(seed)
    tasks = [Task(f"task{i}", kind="regression") for i in range(n_tasks)]
    model = HardSharing(MLP(in_features=inputs, hidden=[width, width]), tasks).to(device)
    return Problem(name, model, torch.randn(batch_size, inputs).to(device), torch.randn(batch_size, n_tasks).to(device))


def clock_on(clock: str, device: str) -> Callable[[], float]:
    """``clock`` read after the device has finished its queued work (CUDA runs asynchronously:
    without the wait a block would be timed as the time to queue its kernels)."""
    now = CLOCKS[clock]
    if torch.device(device).type != "cuda":
        return now

    def synchronised() -> float:
        torch.cuda.synchronize(device)
        return now()
    return synchronised


def measure_routes(shapes: Sequence[tuple[int, int, int, int]] = ROUTE_SHAPES, *, method: str = "mgda",
                   rounds: int = 7, block: int = 10, clock: str = "wall", device: str = "cpu") -> list[RouteRow]:
    """``method`` on the J route and on the no-J route of each MLP shape, against its floor: where
    the no-J Gramian starts to pay (``engine.backward.SMALL_JACOBIAN`` is set from this)."""
    from polytask.engine.backward import Engine

    rows = []
    for shape in shapes:
        steps = {"floor": floor_step(mlp_problem(*shape, device=device))}
        for route in ("jacobian", "autogram"):
            steps[route] = method_step(mlp_problem(*shape, device=device), method, "shared", 1, gramian=route)
        ms = interleaved(steps, rounds=rounds, block=block, now=clock_on(clock, device))
        probe = mlp_problem(*shape, device=device)
        engine = Engine(method, probe.model.shared_parameters(), compare="shared")
        engine.backward(probe.losses()[1])
        entries = shape[2] * sum(p.numel() for p in probe.model.shared_parameters())
        rows.append(RouteRow(shape, entries, ms["floor"], ms["jacobian"] / ms["floor"],
                             ms["autogram"] / ms["floor"], engine.gramian_route))
    return rows


def format_route(row: RouteRow) -> str:
    inputs, width, n_tasks, batch = row.shape
    return (f"{inputs:>6} {width:>6} {n_tasks:>3} {batch:>6} {row.jacobian_entries:>10} {row.floor_ms:>9.2f} "
            f"{row.jacobian:>8.2f} {row.autogram:>8.2f}  {row.auto}")


ROUTE_HEADER = f"{'inputs':>6} {'width':>6} {'T':>3} {'batch':>6} {'T·|θ|':>10} {'floor ms':>9} {'J route':>8} {'no-J':>8}  auto takes"


HEADER = f"{'method':<22} {'needs':<9} {'ms/step':>8} {'×EW':>6} {'×Jac':>6} {'×floor':>7} {'goal':>10}"


def format_row(row: SmallRow) -> str:
    if row.method.startswith("("):
        goal = ""
    else:
        met = "ok" if row.vs_reference <= row.goal else "MISSED"
        goal = f"≤{row.goal:.2f}{'×EW' if row.needs == 'losses' else '×Jac'} {met}"
    return (f"{row.method:<22} {row.needs:<9} {row.ms:>8.3f} {row.vs_equal:>6.2f} {row.vs_jacobian:>6.2f} "
            f"{row.vs_floor:>7.2f} {goal:>10}")


@dataclass(frozen=True)
class SmallResult:
    """The tiny-model rows and the Trainer-vs-loop figure (None when not measured)."""

    rows: list[SmallRow]
    trainer_ms: float | None = None
    loop_ms: float | None = None

    @property
    def trainer_ratio(self) -> float | None:
        return None if self.trainer_ms is None or self.loop_ms is None else self.trainer_ms / self.loop_ms


@contextlib.contextmanager
def _timing(threads: int, clock: str, device: str = "cpu") -> Iterator[None]:
    """``threads`` intra-op threads while timing with ``clock`` on ``device`` (all checked), restored after."""
    if not isinstance(threads, int) or threads < 1:
        raise InvalidParameterError(f"`threads` of bench small must be an int >= 1; found {threads!r}")
    if clock not in CLOCKS:
        raise InvalidParameterError(f"`clock` of bench small must be one of {', '.join(CLOCKS)}; found {clock!r}")
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        raise InvalidParameterError(f"`device` of bench small must be 'cpu', 'cuda' or 'cuda:N'; found {device!r}") from None
    if kind not in ("cpu", "cuda"):
        raise InvalidParameterError(f"`device` of bench small must be 'cpu', 'cuda' or 'cuda:N'; found {device!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"`device` of bench small is {device!r} but CUDA is not available here")
    if kind == "cuda" and clock == "cpu":
        raise InvalidParameterError("`clock` cpu cannot time a CUDA device (its kernels run outside this process's "
                                    "CPU time); use --clock wall with --device cuda")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_routes(*, method: str = "mgda", rounds: int = 7, block: int = 10, threads: int = 1, clock: str = "wall",
               device: str = "cpu", echo: Callable[[str], None] = print) -> list[RouteRow]:
    """The route sweep's table (``polytask bench small --routes``): ``method``'s step ×floor on the
    J route and the no-J route of each MLP in ``ROUTE_SHAPES`` (on CUDA also ``CUDA_ROUTE_SHAPES``,
    where the crossover lies further out), and the route ``auto`` takes."""
    with _timing(threads, clock, device):
        echo(f"{method} on hard-shared MLPs (two hidden layers), ×floor, {device}, {threads} thread(s), {clock} clock, "
             f"median of {rounds} interleaved blocks of {block} steps")
        echo(ROUTE_HEADER)
        shapes = ROUTE_SHAPES + (CUDA_ROUTE_SHAPES if torch.device(device).type == "cuda" else ())
        rows = measure_routes(shapes, method=method, rounds=rounds, block=block, clock=clock, device=device)
        for row in rows:
            echo(format_route(row))
        return rows


def run(methods: Sequence[str] = DEFAULT_METHODS, *, rounds: int = 15, block: int = 20, overhead_repeats: int = 7,
        threads: int = 1, clock: str = "wall", device: str = "cpu", echo: Callable[[str], None] = print) -> SmallResult:
    """The tiny-model table, then the Trainer against a hand-written loop on the demo model
    (``overhead_repeats`` = 0 skips it); what the speed bench calls. ``threads`` intra-op threads
    while timing (1: a small model gains nothing from a second thread, and the ratios are far less
    sensitive to other processes); ``clock`` ``wall`` (elapsed) or ``cpu`` (this process's CPU
    time: on a machine shared with other processes the steadier of the two). ``device`` is the tiny
    model's; the Trainer-vs-loop comparison runs on the CPU whatever it is."""
    with _timing(threads, clock, device):
        echo(f"tiny model (MLP 16→64→64, T=4, batch 32), {device}, {threads} thread(s), {clock} clock, median of "
             f"{rounds} interleaved blocks of {block} steps")
        echo(HEADER)
        rows = measure_tiny(methods, rounds=rounds, block=block, clock=clock, device=device)
        for row in rows:
            echo(format_row(row))
        if overhead_repeats <= 0:
            return SmallResult(rows)
        from polytask.bench import overhead

        echo("")
        over = overhead.run(repeats=overhead_repeats, threads=threads, echo=echo, clock=clock)
        echo(f"  goal ≤ 1.10×: {'ok' if over.ratio <= 1.10 else 'MISSED'}")
        return SmallResult(rows, over.trainer_ms, over.hand_ms)
