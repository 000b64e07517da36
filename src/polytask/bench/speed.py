"""`polytask bench speed`: ms per training step of every method against equal weighting and
against computing the task Jacobian alone, plus peak memory, on an MLP and a small CNN."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from polytask.bench.memory import PeakMemory
from polytask.core.task import Task
from polytask.engine.backward import Engine
from polytask.engine.jacobian import task_jacobian
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
    shared = list(problem.model.shared_parameters())

    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        _, losses = problem.losses()
        task_jacobian(list(losses.values()), shared)
    return step


def method_step(problem: Problem, name: str, compare: str, every: int) -> Callable[[int], None]:
    method = example_method(name)
    method.setup(problem.tasks, sizes={t: 1000 * (i + 1) for i, t in enumerate(problem.tasks)})
    method.to(problem.x.device)
    model = problem.model
    engine = Engine(method, model.shared_parameters(), last_shared_params=model.last_shared_parameters(),
                    compare=compare, every=every if method.needs == "gramian" else 1)  # reuse: Gramian methods only

    def step(i: int) -> None:
        model.zero_grad(set_to_none=True)
        z, losses = problem.losses()
        engine.backward(losses, features=[z])
    return step


def torchjd_step(problem: Problem, aggregator_name: str) -> Callable[[int], None] | None:
    """The same step with TorchJD's aggregator, when TorchJD is installed (for comparison)."""
    try:
        from torchjd import aggregation
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:
        return None
    cls = getattr(aggregation, aggregator_name, None)
    if cls is None:
        return None
    import inspect

    known = {"n_tasks": len(problem.tasks), "c": 0.4}  # CAGrad's c as polytask's default
    required = [p for p in inspect.signature(cls).parameters.values() if p.default is inspect.Parameter.empty]
    if any(p.name not in known for p in required):
        return None
    aggregator = cls(**{p.name: known[p.name] for p in required})
    shared = list(problem.model.shared_parameters())

    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        z, losses = problem.losses()
        mtl_backward(list(losses.values()), features=z)
        jac_to_grad(shared, aggregator)
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
    vs_equal: float
    vs_jacobian: float
    vs_floor: float
    peak_mb: float | None
    params: int


HEADER = (f"{'encoder':<6} {'T':>3} {'method':<22} {'needs':<9} {'mode':<10} {'ms/step':>9} {'×EW':>7} {'×Jac':>7} {'×floor':>7} "
          f"{'peak MB':>8}")


def format_row(row: Row) -> str:
    shown = "-" if row.peak_mb is None else f"{row.peak_mb:.0f}"
    return (f"{row.encoder:<6} {row.tasks:>3} {row.method:<22} {row.needs:<9} {row.mode:<10} {row.ms:>9.1f} "
            f"{row.vs_equal:>7.2f} {row.vs_jacobian:>7.2f} {row.vs_floor:>7.2f} {shown:>8}")


def measure(problem: Problem, methods: Sequence[str], *, steps: int, warmup: int, features: bool, every: int,
            peers: bool, echo: Callable[[str], None]) -> list[Row]:
    """All rows for one (encoder, T): the two references, then every method and mode."""
    dev = problem.x.device
    params = sum(p.numel() for p in problem.model.parameters())
    # the first steps of a process pay for thread-pool start-up and allocator growth
    time_step(jacobian_step(problem), dev, 2, warmup)
    ew_ms, ew_mem = time_step(equal_step(problem), dev, steps, warmup)
    jac_ms, jac_mem = time_step(jacobian_step(problem), dev, steps, warmup)
    floor_ms, floor_mem = time_step(floor_step(problem), dev, steps, warmup)
    rows: list[Row] = []

    def add(method: str, needs: str, mode: str, ms: float, mem: float | None) -> None:
        rows.append(Row(problem.name, len(problem.tasks), method, needs, mode, ms, ms / ew_ms, ms / jac_ms, ms / floor_ms,
                        mem, params))
        echo(format_row(rows[-1]))

    add("(equal: 1 backward)", "losses", "-", ew_ms, ew_mem)
    add("(task Jacobian alone)", "gramian", "-", jac_ms, jac_mem)
    add("(floor: T backwards)", "gramian", "-", floor_ms, floor_mem)
    for name in methods:
        cls = METHODS.get(name)
        modes = ["auto"] if cls.needs == "losses" else [cls.compare]
        if cls.needs == "gramian" and features and cls.compare != "features":
            modes.append("features")
        for mode in modes:
            label = name if every == 1 or cls.needs != "gramian" else f"{name} (every {every})"
            # past the engine's first steps, where `jacobian: auto` times loop against batched
            ms, mem = time_step(method_step(problem, name, mode, every), dev, steps, max(warmup, 5), amortised=every > 1)
            add(label, "features" if mode == "features" else cls.needs, mode if mode != "auto" else "-", ms, mem)
        if peers and name in TORCHJD_NAMES:
            step = torchjd_step(problem, TORCHJD_NAMES[name])
            if step is not None:
                ms, mem = time_step(step, dev, steps, warmup)
                add(f"torchjd:{TORCHJD_NAMES[name]}", "jacobian", "peer", ms, mem)
    return rows


def run(encoders: Sequence[str], task_counts: Sequence[int], methods: Sequence[str], *, steps: int = 5,
        warmup: int = 2, features: bool = True, every: int = 1, peers: bool = False, device: str = "cpu",
        echo: Callable[[str], None] = print) -> list[Row]:
    echo(HEADER)
    rows: list[Row] = []
    for encoder in encoders:
        for n_tasks in task_counts:
            problem = make_problem(encoder, n_tasks, torch.device(device))
            rows += measure(problem, methods, steps=steps, warmup=warmup, features=features, every=every,
                            peers=peers, echo=echo)
    return rows
