"""`polytask bench heads`: what should the task-specific parameters of a gradient method receive?

A gradient method puts d = Σ wᵢ gᵢ on the shared parameters θ. Each task's head can then get
wᵢ ∇Lᵢ (``heads: weighted``, the gradient of Σ wᵢ Lᵢ) or ∇Lᵢ (``heads: unweighted``, as LibMTL's
gradient methods and TorchJD's ``mtl_backward`` do). With MGDA's or CAGrad's weights summing to 1
over T tasks, the weighted heads learn about 1/T as fast. This benchmark trains every bundled
example under both conventions, for each method and seed, next to single-task baselines trained
once per seed, and reports each task's main test metric and Δm% against those baselines.
"""

from __future__ import annotations

import csv
import json
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from polytask.config.build import build_model, restrict, trainer_kwargs
from polytask.config.schema import load_config
from polytask.metrics.delta_m import delta_m

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
#: the bundled benchmarks and the overrides that keep one run to seconds on two CPU cores
SUITES: dict[str, tuple[str, list[str]]] = {
    "adult": ("adult.yaml", ["train.epochs=4"]),
    "multimnist": ("multimnist.yaml", ["train.epochs=3", "data.options.val_size=1000"]),
    "reviews": ("reviews.yaml", ["train.epochs=3"]),
    "movielens": ("movielens_esmm.yaml", ["train.epochs=2"]),
}
METHODS = ("mgda", "cagrad", "upgrad", "nash_mtl", "pcgrad")
CONVENTIONS = ("weighted", "unweighted")
FIELDS = ("dataset", "method", "heads", "seed", "delta_m", "seconds", "metrics")


@dataclass
class Cell:
    dataset: str
    method: str
    heads: str
    seed: int
    metrics: dict[str, float]  # task → main test metric
    delta_m: float
    seconds: float


def _config(dataset: str, seed: int, extra: Sequence[str]):
    name, overrides = SUITES[dataset]
    return load_config(EXAMPLES / name, [*overrides, f"seed={seed}", "run.progress=false", *extra])


def run(datasets: Sequence[str], methods: Sequence[str], seeds: Sequence[int], *, csv_path: Path | None = None,
        echo: Callable[[str], None] = print) -> list[Cell]:
    from polytask.cli.pipeline import prepare
    from polytask.train.trainer import Trainer

    cells: list[Cell] = []
    done: set[tuple[str, str, str, int]] = set()
    if csv_path is not None and csv_path.exists():  # resumable: finished cells are read back, never rerun
        with csv_path.open() as handle:
            for row in csv.DictReader(handle):
                cells.append(Cell(row["dataset"], row["method"], row["heads"], int(row["seed"]), json.loads(row["metrics"]),
                                  float(row["delta_m"]), float(row["seconds"])))
                done.add((row["dataset"], row["method"], row["heads"], int(row["seed"])))
    for dataset in datasets:
        for seed in seeds:
            cfg = _config(dataset, seed, [])
            loaded, encoder, _, _ = prepare(cfg)
            stems = loaded.encoder.get("_stems")
            main = {t.name: t.main_metric for t in loaded.tasks}
            baselines: dict[str, dict[str, float]] | None = None
            for method in methods:
                for heads in CONVENTIONS:
                    if (dataset, method, heads, seed) in done:
                        continue
                    if baselines is None:
                        baselines = {}
                        for task in loaded.tasks:
                            torch.manual_seed(seed)
                            model = build_model(cfg, [task], encoder, {task.name: stems[task.name]} if stems else None)
                            single = Trainer(model, [task], **{**trainer_kwargs(cfg), "method": "equal"})
                            report = single.fit(restrict(loaded.train, task.name), restrict(loaded.val, task.name),
                                                restrict(loaded.test, task.name))
                            baselines[task.name] = report.metrics[task.name]
                    cfg_m = _config(dataset, seed, [f"method.name={method}", f"engine.heads={heads}"])
                    torch.manual_seed(seed)
                    model = build_model(cfg_m, loaded.tasks, encoder, stems)
                    started = time.perf_counter()
                    trainer = Trainer(model, loaded.tasks, **trainer_kwargs(cfg_m), baselines=baselines)
                    report = trainer.fit(loaded.train, loaded.val, loaded.test)
                    cell = Cell(dataset, method, heads, seed, {t: report.metrics[t][m] for t, m in main.items()},
                                delta_m(report.metrics, baselines, main), time.perf_counter() - started)
                    cells.append(cell)
                    if csv_path is not None:
                        _append(csv_path, cell)
                    echo(f"{dataset:<11} {method:<9} {heads:<10} seed {seed}: Δm {cell.delta_m:+7.2f}%  "
                         + "  ".join(f"{t} {v:.4f}" for t, v in cell.metrics.items()) + f"  ({cell.seconds:.0f} s)")
    return cells


def _append(path: Path, cell: Cell) -> None:
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow({"dataset": cell.dataset, "method": cell.method, "heads": cell.heads, "seed": cell.seed,
                         "delta_m": f"{cell.delta_m:.6f}", "seconds": f"{cell.seconds:.2f}",
                         "metrics": json.dumps(cell.metrics)})


def table(cells: Sequence[Cell]) -> str:
    """Markdown: Δm% mean ± std over seeds per data set, method and convention, and the winner."""
    lines = ["| data set | method | Δm% weighted | Δm% unweighted | better |", "| --- | --- | --- | --- | --- |"]
    wins: dict[str, int] = {c: 0 for c in CONVENTIONS}
    for dataset in dict.fromkeys(c.dataset for c in cells):
        for method in dict.fromkeys(c.method for c in cells if c.dataset == dataset):
            stats: dict[str, Any] = {}
            for heads in CONVENTIONS:
                values = [c.delta_m for c in cells if (c.dataset, c.method, c.heads) == (dataset, method, heads)]
                if values:
                    stats[heads] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            if len(stats) < 2:
                continue
            best = max(stats, key=lambda h: stats[h][0])
            wins[best] += 1
            shown = [f"{stats[h][0]:+.2f} ± {stats[h][1]:.2f}" for h in CONVENTIONS]
            lines.append(f"| {dataset} | {method} | {shown[0]} | {shown[1]} | {best} |")
    means = {h: statistics.fmean([c.delta_m for c in cells if c.heads == h] or [float("nan")]) for h in CONVENTIONS}
    lines.append(f"| all | all | {means['weighted']:+.2f} | {means['unweighted']:+.2f} | "
                 f"weighted {wins['weighted']} / unweighted {wins['unweighted']} cells |")
    return "\n".join(lines)
