"""`polytask bench speed`: ms per training step of every method against the pure floor of an
exact gradient method (T per-task backward passes, gradients discarded), against computing the
task Jacobian alone (the same passes writing J) and against equal weighting, with the peak
memory each adds to equal weighting's, on an MLP and a small CNN.

Every variant of one (encoder, T) is timed in the same process, interleaved: each round runs one
step of every variant, and the median over the rounds is reported, so a change in the machine's
load touches all variants alike. Gramian methods get one row per way of computing G: the task
Jacobian (``gramian: jacobian``) and the no-J Gramian (``autogram``), and with ``--peers``
TorchJD's aggregator (``mtl_backward`` + ``jac_to_grad``) and TorchJD's autogram engine.
"""

from __future__ import annotations

import copy
import ctypes
import inspect
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polytask.bench.memory import PeakMemory
from polytask.core.task import Task
from polytask.engine.backward import Engine
from polytask.engine.jacobian import _write_row
from polytask.methods.base import METHODS, example_method
from polytask.models.base import MultiTaskModel
from polytask.models.encoders import CNN, MLP
from polytask.models.hard_sharing import HardSharing


@dataclass
class Problem:
    name: str
    model: MultiTaskModel
    x: Tensor
    y: Tensor

    @property
    def tasks(self) -> list[str]:
        return list(self.model.task_names)

    def losses(self) -> tuple[Tensor, dict[str, Tensor]]:
        z = self.model.encode(self.x)
        out = self.model.decode(z)
        return z, {t: (out[t] - self.y[:, i]).pow(2).mean() for i, t in enumerate(self.tasks)}


def make_problem(encoder: str, n_tasks: int, device: torch.device, seed: int = 0) -> Problem:
    """The issue's MLP (512 → 1024 → 1024 → 256, batch 256) or a small CNN (3×32×32, batch 64)."""
    torch.manual_seed(seed)
    tasks = [Task(f"task{i}", kind="regression") for i in range(n_tasks)]
    if encoder == "mlp":
        module, x = MLP(in_features=512, hidden=[1024, 1024, 256]), torch.randn(256, 512)
    elif encoder == "cnn":
        module, x = CNN(in_channels=3, channels=[16, 32], out_features=128), torch.randn(64, 3, 32, 32)
    else:
        raise ValueError(f"unknown benchmark encoder {encoder!r}; expected mlp or cnn")
    model = HardSharing(module, tasks).to(device)
    return Problem(encoder, model, x.to(device), torch.randn(len(x), n_tasks, device=device))


def time_step(step: Callable[[int], None], device: torch.device, steps: int, warmup: int,
              amortised: bool = False) -> tuple[float, float | None]:
    """Median ms per call of ``step`` (the mean with ``amortised``, where every k-th step costs
    more) and the peak memory (MB) of one call."""
    for i in range(warmup):
        step(i)
    times = []
    with PeakMemory(device) as memory:
        for i in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(warmup + i)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - start) * 1000)
    return (statistics.fmean(times) if amortised else statistics.median(times)), memory.peak_mb


def equal_step(problem: Problem) -> Callable[[int], None]:
    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        _, losses = problem.losses()
        sum(losses.values()).backward()
    return step


def floor_step(problem: Problem) -> Callable[[int], None]:
    """The floor of an exact gradient method: T per-task backward passes, gradients discarded."""
    shared = list(problem.model.shared_parameters())

    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        _, losses = problem.losses()
        values = list(losses.values())
        for k, loss in enumerate(values):
            torch.autograd.grad(loss, shared, retain_graph=k < len(values) - 1)
    return step


def jacobian_step(problem: Problem) -> Callable[[int], None]:
    """T backward passes writing J, into storage kept from step to step as the engine's J routes keep
    it (a fresh J of tens of MB is faulted in page by page, which is not the cost of writing it).

    The passes are ``torch.autograd.grad``'s, as a user's own loop would take them, not the engine's
    (which skip that call's Python, :mod:`polytask.engine.passes`): the reference is what torch's
    public API costs, so a method's ratio to it counts what the engine saves there."""
    shared = list(problem.model.shared_parameters())
    sizes = [p.numel() for p in shared]
    kept: list[Tensor] = []

    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        _, losses = problem.losses()
        if not kept:  # the first step's J is the storage of the later ones
            kept.append(torch.empty(len(losses), sum(sizes), dtype=shared[0].dtype, device=shared[0].device))
        for k, loss in enumerate(losses.values()):
            _write_row(kept[0][k], torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), sizes)
    step.release = kept.clear  # type: ignore[attr-defined]  # for `measure`: J is made anew inside its measurement
    return step


def method_step(problem: Problem, name: str, compare: str, every: int, gramian: str = "jacobian"
                ) -> Callable[[int], None]:
    """One engine step of method ``name``; ``gramian`` is the engine's (``jacobian``: J, then G;
    ``autogram``: G without J; ``auto`` the engine's default, decided from shapes on the first step)."""
    # Bilevel methods are timed as the Trainer runs them (their default parameters, the look-ahead on),
    # not with the suites' example parameters, which switch the look-ahead off.
    bilevel = METHODS.get(name).lookahead
    method = METHODS.create(name) if bilevel else example_method(name)
    method.setup(problem.tasks, sizes={t: 1000 * (i + 1) for i, t in enumerate(problem.tasks)})
    method.to(problem.x.device)
    model = problem.model
    engine = Engine(method, model.shared_parameters(), last_shared_params=model.last_shared_parameters(),
                    compare=compare, every=every if method.needs == "gramian" else 1,  # reuse: Gramian methods only
                    gramian=gramian, params=model.parameters())  # as the Trainer, Lightning and SAC build it
    if getattr(method, "lookahead", False):
        return _bilevel_step(problem, engine)

    def step(i: int) -> None:
        model.zero_grad(set_to_none=True)
        z, losses = problem.losses()
        engine.backward(losses, features=[z])
    step.release = engine.release_memory  # type: ignore[attr-defined]  # for `measure`: what it keeps between steps
    return step


def _bilevel_step(problem: Problem, engine: Engine) -> Callable[[int], None]:
    """A look-ahead method's step as the Trainer builds it: the even rows are the step's (inner)
    batch, the odd rows the outer batch, and the closure evaluates either at displaced θ."""
    model, halves = problem.model, {"inner": slice(0, None, 2), "outer": slice(1, None, 2)}
    names = {id(p): n for n, p in model.named_parameters()}

    def half_losses(replace: dict[int, Tensor], batch: str = "outer") -> dict[str, Tensor]:
        rows = halves[batch]
        out = torch.func.functional_call(model, {names[i]: v for i, v in replace.items()}, (problem.x[rows],))
        return {t: (out[t] - problem.y[rows, i]).pow(2).mean() for i, t in enumerate(problem.tasks)}

    def step(i: int) -> None:
        model.zero_grad(set_to_none=True)
        rows = halves["inner"]
        out = model(problem.x[rows])
        engine.backward({t: (out[t] - problem.y[rows, k]).pow(2).mean() for k, t in enumerate(problem.tasks)},
                        lookahead=half_losses)
    return step


def torchjd_step(problem: Problem, aggregator_name: str) -> Callable[[int], None] | None:
    """The same step with TorchJD's aggregator, when TorchJD is installed (for comparison)."""
    try:
        from torchjd import aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    cls = getattr(aggregation, aggregator_name, None)
    arguments = None if cls is None else _torchjd_arguments(cls, len(problem.tasks))
    if arguments is None:
        return None
    aggregator = cls(**arguments)
    shared = list(problem.model.shared_parameters())

    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        z, losses = problem.losses()
        mtl_backward(list(losses.values()), features=z)
        jac_to_grad(shared, aggregator)
    return step


def _torchjd_arguments(cls: type, n_tasks: int) -> dict[str, object] | None:
    """The required constructor arguments TorchJD's class needs, or None when one is unknown."""
    known = {"n_tasks": n_tasks, "c": 0.4, "alpha": 1.0}  # CAGrad's c as polytask's default; FairGrad's α = 1
    required = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    if any(p.name not in known for p in required):
        return None
    return {p.name: known[p.name] for p in required}


def torchjd_autogram_step(problem: Problem, aggregator_name: str) -> Callable[[int], None] | None:
    """TorchJD's own no-J path: ``autogram.Engine`` on the encoder, the matching ``Weighting`` on
    its Gramian, one backward of Σ wᵢLᵢ. On a copy of the model: TorchJD's forward hooks stay on
    the modules they hook and would slow every other variant's forward."""
    try:
        from torchjd import aggregation
        from torchjd.autogram import Engine as TorchJDEngine
    except ImportError:
        return None
    cls = getattr(aggregation, f"{aggregator_name}Weighting", None)
    arguments = None if cls is None else _torchjd_arguments(cls, len(problem.tasks))
    if arguments is None:
        return None
    weighting = cls(**arguments)
    model = copy.deepcopy(problem.model)
    engine = TorchJDEngine(model.encoder, batch_dim=None)

    def step(i: int) -> None:
        model.zero_grad(set_to_none=True)
        out = model.decode(model.encode(problem.x))
        losses = torch.stack([(out[t] - problem.y[:, k]).pow(2).mean() for k, t in enumerate(problem.tasks)])
        losses.backward(weighting(engine.compute_gramian(losses)))
    return step


TORCHJD_NAMES = {"upgrad": "UPGrad", "mgda": "MGDA", "pcgrad": "PCGrad", "cagrad": "CAGrad", "imtl_g": "IMTLG",
                 "dualproj": "DualProj", "aligned_mtl": "AlignedMTL", "nash_mtl": "NashMTL", "config": "ConFIG",
                 "gradvac": "GradVac", "fairgrad": "FairGrad", "graddrop": "GradDrop", "equal": "Sum"}


@dataclass
class Row:
    encoder: str
    tasks: int
    method: str
    needs: str
    mode: str
    ms: float
    vs_floor: float  # the pure floor: T backward passes, gradients discarded
    vs_jacobian: float  # the same passes writing J (the J-writing floor)
    vs_equal: float
    peak_mb: float | None
    extra_mb: float | None  # peak memory above equal weighting's
    params: int


HEADER = (f"{'encoder':<6} {'T':>3} {'method':<24} {'needs':<9} {'mode':<10} {'ms/step':>9} {'×floor':>7} {'×Jac':>7} "
          f"{'×EW':>7} {'peak MB':>8} {'+MB/EW':>8}")


def format_row(row: Row) -> str:
    peak = "-" if row.peak_mb is None else f"{row.peak_mb:.0f}"
    extra = "-" if row.extra_mb is None else f"{row.extra_mb:+.0f}"
    return (f"{row.encoder:<6} {row.tasks:>3} {row.method:<24} {row.needs:<9} {row.mode:<10} {row.ms:>9.1f} "
            f"{row.vs_floor:>7.2f} {row.vs_jacobian:>7.2f} {row.vs_equal:>7.2f} {peak:>8} {extra:>8}")


@dataclass
class Variant:
    label: str
    needs: str
    mode: str
    step: Callable[[int], None]
    amortised: bool = False


def variants(problem: Problem, methods: Sequence[str], *, features: bool, every: int, peers: bool) -> list[Variant]:
    """The references, then every method and way of computing its update, for one (encoder, T)."""
    out = [Variant("(equal: 1 backward)", "losses", "-", equal_step(problem)),
           Variant("(floor: T backwards)", "gramian", "-", floor_step(problem)),
           Variant("(task Jacobian alone)", "gramian", "-", jacobian_step(problem))]
    for name in methods:
        cls = METHODS.get(name)
        label = name if every == 1 or cls.needs != "gramian" else f"{name} (every {every})"
        reuse = every > 1 and cls.needs == "gramian"
        if cls.needs == "losses":
            out.append(Variant(label, "losses", "-", method_step(problem, name, "auto", every)))
            continue
        out.append(Variant(label, cls.needs, cls.compare, method_step(problem, name, cls.compare, every), reuse))
        if cls.needs == "gramian" and cls.compare == "shared":
            out.append(Variant(label, "gramian", "autogram", method_step(problem, name, "shared", every, "autogram"),
                               reuse))
        if cls.needs == "gramian" and features and cls.compare != "features":
            out.append(Variant(label, "features", "features", method_step(problem, name, "features", every), reuse))
        if peers and name in TORCHJD_NAMES:
            step = torchjd_step(problem, TORCHJD_NAMES[name])
            if step is not None:
                out.append(Variant(f"torchjd:{TORCHJD_NAMES[name]}", "jacobian", "peer", step))
            step = torchjd_autogram_step(problem, TORCHJD_NAMES[name])
            if step is not None:
                out.append(Variant(f"torchjd:{TORCHJD_NAMES[name]}", "gramian", "peer:ag", step))
    return out


#: what a step's time is read from: the wall clock, or the process's CPU time (all threads), which a
#: loaded machine disturbs far less (with one thread it is the work done; with several it also
#: counts their spin-waiting)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def measure(problem: Problem, methods: Sequence[str], *, steps: int, warmup: int, features: bool, every: int,
            peers: bool, echo: Callable[[str], None], clock: str = "wall") -> list[Row]:
    """All rows for one (encoder, T): every variant timed in interleaved rounds (medians; the
    mean with ``every`` > 1, where every k-th step costs more), then each one's peak memory."""
    now = CLOCKS[clock]
    dev = problem.x.device
    params = sum(p.numel() for p in problem.model.parameters())
    todo = variants(problem, methods, features=features, every=every, peers=peers)
    times: list[list[float]] = [[] for _ in todo]
    # past the engines' first steps, where `jacobian: auto` times loop against batched
    for r in range(max(warmup, 5) + steps):
        for k, variant in enumerate(todo):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            start = now()
            variant.step(r)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r >= max(warmup, 5):
                times[k].append((now() - start) * 1000)
    peaks: list[float | None] = []
    for variant in todo:
        release = getattr(variant.step, "release", None)
        if release is not None:  # J's kept storage is made anew inside the measurement, so its peak counts J
            release()
        with PeakMemory(dev) as memory:
            for r in range(2):
                variant.step(r)
        peaks.append(memory.peak_mb)
    ms = [statistics.fmean(t) if v.amortised else statistics.median(t) for v, t in zip(todo, times, strict=True)]
    ew_ms, floor_ms, jac_ms = ms[0], ms[1], ms[2]
    rows: list[Row] = []
    for variant, value, peak in zip(todo, ms, peaks, strict=True):
        extra = None if peak is None or peaks[0] is None else peak - peaks[0]
        rows.append(Row(problem.name, len(problem.tasks), variant.label, variant.needs, variant.mode, value,
                        value / floor_ms, value / jac_ms, value / ew_ms, peak, extra, params))
        echo(format_row(rows[-1]))
    return rows


def _fixed_mmap_threshold() -> None:
    """Make glibc serve every allocation over 64 KiB by mmap and give it back on free.

    By default glibc raises its mmap threshold after each large free, up to 32 MiB, and then
    keeps such blocks on its heap: the resident set stops following what is live, and a later
    variant's peak (read from the resident high-water mark) looks like zero. A fixed threshold
    turns that adjustment off."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
        except OSError as exc:  # not glibc: peaks are read as they are, and the table says so
            warnings.warn(f"could not fix the mmap threshold ({exc}); peak MB may under-read", stacklevel=2)


def run(encoders: Sequence[str], task_counts: Sequence[int], methods: Sequence[str], *, steps: int = 5,
        warmup: int = 2, features: bool = True, every: int = 1, peers: bool = False, device: str = "cpu",
        clock: str = "wall", echo: Callable[[str], None] = print) -> list[Row]:
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; expected {' or '.join(CLOCKS)}")
    _fixed_mmap_threshold()
    echo(HEADER)
    rows: list[Row] = []
    for encoder in encoders:
        for n_tasks in task_counts:
            problem = make_problem(encoder, n_tasks, torch.device(device))
            rows += measure(problem, methods, steps=steps, warmup=warmup, features=features, every=every,
                            peers=peers, echo=echo, clock=clock)
    return rows
