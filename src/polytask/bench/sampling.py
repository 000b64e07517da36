"""`polytask bench sampling`: per-task test metrics of one model trained under different task samplers
when the task data sets differ in size by orders of magnitude (the multi-input regime).

Three tasks of UCI Adult get disjoint training sets of ~100×, 10× and 1× the smallest size
(income 20,000 / marital 2,000 / hours 200 by default), built from the real data with
:func:`polytask.datasets.split_by_task`; each task has its own validation set (picks the best
epoch) and test set (reported), of equal size so the small task is measured as precisely as
the large one. The model, optimiser, epochs and number of steps are the same for every
sampler: only which task's data a step draws from changes.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from polytask.core.errors import InvalidParameterError
from polytask.data.dataset import MultiOutputDataset, TaskDatasets
from polytask.datasets import load, split_by_task
from polytask.models.encoders import MLP
from polytask.models.hard_sharing import HardSharing
from polytask.train.callbacks import Callback, TrainStep

#: The samplers compared by default: registry name and parameters, under a display label.
DEFAULT_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "proportional": ("proportional", {}),
    "temperature τ=2": ("temperature", {"temperature": 2.0}),
    "temperature τ=3": ("temperature", {"temperature": 3.0}),
    "uniform": ("uniform", {}),
    "annealed τ 1→5": ("annealed", {"start_temperature": 1.0, "end_temperature": 5.0}),
}
#: Columns of the table: (task, metric).
COLUMNS = (("income", "auroc"), ("income", "accuracy"), ("marital", "auroc"), ("marital", "accuracy"),
           ("hours", "r2"), ("hours", "rmse"))
DEFAULT_SIZES = {"income": 20000, "marital": 2000, "hours": 200}


@dataclass
class Result:
    """One sampler's runs: test metrics per seed and the share of training steps each task got."""

    label: str
    sampler: str
    metrics: list[dict[str, dict[str, float]]] = field(default_factory=list)
    shares: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def mean(self, task: str, metric: str) -> tuple[float, float]:
        values = [m[task][metric] for m in self.metrics]
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def task_data(sizes: Mapping[str, int], eval_size: int, seed: int) -> tuple[list, TaskDatasets, TaskDatasets, TaskDatasets, int]:
    """Adult's tasks, per-task train sets of ``sizes``, per-task val and test sets of ``eval_size`` each."""
    for task, n in sizes.items():
        if task not in DEFAULT_SIZES:
            raise InvalidParameterError(f"bench sampling has tasks {', '.join(DEFAULT_SIZES)}; found '{task}'")
        if not isinstance(n, int) or n < 1:
            raise InvalidParameterError(f"task size of '{task}' must be an int >= 1; found {n!r}")
    loaded = load("adult", tasks=list(sizes), seed=seed)
    assert isinstance(loaded.train, MultiOutputDataset) and isinstance(loaded.val, MultiOutputDataset)
    assert isinstance(loaded.test, MultiOutputDataset)
    train = split_by_task(loaded.train, dict(sizes), seed)
    val = split_by_task(loaded.val, {t: eval_size for t in sizes}, seed)
    test = split_by_task(loaded.test, {t: eval_size for t in sizes}, seed)
    return loaded.tasks, train, val, test, int(loaded.input_shape[0])


def run(samplers: Mapping[str, tuple[str, dict[str, Any]]] | None = None, *, sizes: Mapping[str, int] | None = None,
        seeds: Sequence[int] = (0,), epochs: int = 5, batch_size: int = 64, lr: float = 1e-3, eval_size: int = 2000,
        echo: Callable[[str], None] = print) -> list[Result]:
    """Train the same model under each sampler and seed; return per-task test metrics."""
    samplers = dict(samplers or DEFAULT_SAMPLERS)
    sizes = dict(sizes or DEFAULT_SIZES)
    results = {label: Result(label, name) for label, (name, _) in samplers.items()}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64-row MLP step is dominated by thread hand-offs; one thread is fastest
    try:
        _run(samplers, sizes, seeds, results, epochs=epochs, batch_size=batch_size, lr=lr, eval_size=eval_size, echo=echo)
    finally:
        torch.set_num_threads(threads)
    return list(results.values())


class StepShares(Callback):
    """Counts the steps each task trained in."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def on_step_end(self, trainer: Any, step: TrainStep) -> None:
        for task, loss in step.losses.items():
            if loss is not None:
                self.counts[task] = self.counts.get(task, 0) + 1


def _run(samplers: Mapping[str, tuple[str, dict[str, Any]]], sizes: dict[str, int], seeds: Sequence[int],
         results: dict[str, Result], *, epochs: int, batch_size: int, lr: float, eval_size: int,
         echo: Callable[[str], None]) -> None:
    from polytask.train.trainer import Trainer

    for seed in seeds:
        tasks, train, val, test, width = task_data(sizes, eval_size, seed)
        for label, (name, params) in samplers.items():
            torch.manual_seed(seed)
            model = HardSharing(MLP(in_features=width, hidden=[128, 64]), tasks)
            shares = StepShares()
            trainer = Trainer(model, tasks, method="equal", sampler={"name": name, **params},
                              loop={"epochs": epochs, "batch_size": batch_size}, optim={"lr": lr},
                              run={"progress": False}, callbacks=[shares], seed=seed)
            started = time.perf_counter()
            report = trainer.fit(train, val, test)
            result = results[label]
            result.seconds += time.perf_counter() - started
            result.metrics.append(report.metrics)
            steps = max(trainer.step_index, 1)
            result.shares.append({t: shares.counts.get(t, 0) / steps for t in sizes})
            echo(f"  seed {seed} {label:<16} done in {time.perf_counter() - started:5.1f} s (best epoch {report.best_epoch})")


def format_results(results: Sequence[Result], sizes: Mapping[str, int] | None = None) -> str:
    """The comparison table: step shares per task, then per-task test metrics (mean ± std over seeds)."""
    sizes = dict(sizes or DEFAULT_SIZES)
    share_header = "steps % " + "/".join(t[:3] for t in sizes)
    header = f"{'sampler':<18} {share_header:>20}" + "".join(f" {f'{t} {m}':>18}" for t, m in COLUMNS if t in sizes)
    lines = [header, "-" * len(header)]
    for r in results:
        shares = "/".join(f"{100 * statistics.fmean(s[t] for s in r.shares):.1f}" for t in sizes)
        line = f"{r.label:<18} {shares:>20}"
        for task, metric in COLUMNS:
            if task in sizes:
                mean, std = r.mean(task, metric)
                line += f" {f'{mean:.4f} ± {std:.4f}':>18}"
        lines.append(line)
    return "\n".join(lines)
