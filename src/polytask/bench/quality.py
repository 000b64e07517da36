"""`polytask bench quality`: what each method and architecture is worth on every bundled real data set.

For each data set and seed: one single-task baseline per task (the data set's example config
with one task and equal weighting), then every method (hard sharing) and the main architectures
(equal weighting), each a cell, and for the tabular sets a gradient-boosting reference (one
LightGBM model per task, tuned on the validation split). Each cell records every task's test
metrics; Δm% (``polytask.metrics.delta_m``) compares a cell with the single-task baselines of its
seed (the seed also draws the split). Cells go to a tidy CSV as they finish
(``polytask.bench.cells``): a rerun skips finished cells, so a killed benchmark resumes.

Budget: each data set's cells train for a fixed number of epochs on a stated number of rows
(``SUITES``); a cell also stops after the epoch in which its wall time passes ``budget_s``
(the epochs it ran are recorded), so one slow method cannot take the whole run.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.bench.cells import Cell, CellKey, append, finished, read
from polytask.core.errors import InvalidParameterError, closest
from polytask.train.callbacks import Callback

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
#: equal weighting, then the loss-balancing (uncertainty, FAMO) and gradient methods (DB-MTL,
#: Nash-MTL, UPGrad, FairGrad) the many-task comparison is about, then other well-known methods
CORE_METHODS = ("equal", "uncertainty", "db_mtl", "famo", "nash_mtl", "upgrad", "fairgrad")
FULL_METHODS = (*CORE_METHODS, "pcgrad", "cagrad", "mgda", "imtl_g", "aligned_mtl", "rlw", "dwa", "gls")


@dataclass(frozen=True)
class DataSpec:
    """One data set in a suite: its example config, the overrides that set the budget, the
    architecture rows (label → example config) and whether a gradient-boosting reference applies."""

    config: str
    overrides: tuple[str, ...]
    budget_s: float
    architectures: tuple[tuple[str, str], ...] = ()
    reference: bool = False
    reference_rounds: int = 1000
    reference_leaves: tuple[int, ...] = (31, 127)
    methods: tuple[str, ...] | None = None  # this data set's methods when --methods is not given (None: the suite's)
    alt_metric: str | None = None  # a second Δm column from another metric of the same cells
    task_groups: tuple[tuple[str, tuple[str, ...]], ...] = ()  # Δm columns over subsets of the tasks
    note: str = ""

    def describe(self) -> str:
        shown = ", ".join(o for o in self.overrides if not o.startswith("run."))
        return f"{self.config} with {shown or 'its own settings'}; at most {self.budget_s:g} s per cell"


@dataclass(frozen=True)
class Suite:
    name: str
    datasets: dict[str, DataSpec]
    methods: tuple[str, ...]
    seeds: int
    note: str = ""


FULL = Suite("full", {
    "qm9": DataSpec("qm9.yaml", ("train.epochs=10", "data.options.rows=12000"), 150,
                    (("mmoe", "qm9.yaml"), ("wide_trunk", "qm9.yaml")),
                    reference=True, reference_leaves=(63,), methods=FULL_METHODS,
                    task_groups=(("energies", ("u0", "u", "h", "g")),
                                 ("other 8", ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "cv")))),
    "yeast": DataSpec("yeast.yaml", ("train.epochs=15",), 150, methods=FULL_METHODS, alt_metric="auroc"),
    "diamonds": DataSpec("diamonds.yaml", ("train.epochs=5", "data.options.rows=20000"), 60, (("mmoe", "diamonds.yaml"),),
                         reference=True, reference_leaves=(31,)),
    "adult": DataSpec("adult.yaml", ("train.epochs=4",), 60, (("mmoe", "adult_mmoe.yaml"),), reference=True),
    "multimnist": DataSpec("multimnist.yaml", ("train.epochs=3", "data.options.train_size=4000",
                                               "data.options.val_size=1000", "data.options.test_size=2000"), 240,
                           (("mtan", "multimnist_mtan.yaml"),)),
    "reviews": DataSpec("reviews.yaml", ("train.epochs=3", "data.options.max_rows=12000"), 60),
    "movielens": DataSpec("movielens_esmm.yaml", ("train.epochs=2", "data.options.max_rows=60000"), 60),
}, CORE_METHODS, 3, note=f"the many-task sets (QM9, Yeast) also run {', '.join(FULL_METHODS[len(CORE_METHODS):])}")
QUICK = Suite("quick", {
    "diamonds": DataSpec("diamonds.yaml", ("train.epochs=1", "data.options.rows=1500"), 10, reference=True,
                         reference_rounds=50),
}, ("equal", "uncertainty"), 1, note="a smoke run: one tiny data set, two methods, one seed")
SUITES = {s.name: s for s in (QUICK, FULL)}
#: the architecture rows replace ``model.architecture`` for configs that name another file's data
#: (``wide_trunk``: hard sharing with a 4× wider shared MLP, 1024 → 512, asking whether the shared
#: trunk's capacity is what a many-task set lacks)
_ARCHITECTURE_OVERRIDES = {"mmoe": ("model.architecture=mmoe", "model.options.num_experts=4"),
                           "wide_trunk": ("model.encoder.hidden=[1024, 512]",)}


@dataclass
class Plan:
    """The cells a run will look at, in order, and how many still need training."""

    suite: Suite
    datasets: list[str]
    methods: list[str] | None  # None: each data set's own (DataSpec.methods, else the suite's)
    seeds: list[int]
    csv_path: Path
    cells: dict[CellKey, Cell] = field(default_factory=dict)


def plan(suite: str, datasets: Sequence[str] | None, methods: Sequence[str] | None, seeds: int | None,
         csv_path: Path) -> Plan:
    """Check the names and read the finished cells back."""
    from polytask.methods import METHODS

    if suite not in SUITES:
        raise InvalidParameterError(f"--suite must be one of {', '.join(SUITES)}; found {suite!r}")
    chosen = SUITES[suite]
    names = list(datasets) if datasets else list(chosen.datasets)
    for name in names:
        if name not in FULL.datasets:
            raise InvalidParameterError(f"--datasets: no data set '{name}' in bench quality.{closest(name, FULL.datasets)} "
                                        f"Data sets: {', '.join(FULL.datasets)}")
    picked = list(methods) if methods else None
    if picked == ["all"]:
        picked = METHODS.names()
    for method in picked or [m for spec in chosen.datasets.values() for m in spec.methods or chosen.methods]:
        METHODS.get(method)  # an unknown name is one clear error listing the methods
    count = chosen.seeds if seeds is None else seeds
    if not isinstance(count, int) or count < 1:
        raise InvalidParameterError(f"--seeds must be a positive int; found {seeds!r}")
    return Plan(chosen, names, picked, list(range(count)), csv_path, read(csv_path))


def _spec(p: Plan, dataset: str) -> DataSpec:
    return p.suite.datasets.get(dataset) or FULL.datasets[dataset]


def _config(spec: DataSpec, seed: int, file: str | None = None, extra: Sequence[str] = ()):
    from polytask.config.schema import load_config

    return load_config(EXAMPLES / (file or spec.config), [*spec.overrides, f"seed={seed}", "run.progress=false",
                                                          *extra])


class TimeBudget(Callback):
    """Stops a fit after the epoch in which its wall time passes ``seconds``."""

    state_key = "bench_time_budget"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = time.perf_counter()

    def on_fit_start(self, trainer: Any) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, trainer: Any, rows: list[dict[str, Any]]) -> None:
        if time.perf_counter() - self.started > self.seconds:
            trainer.stop = True


def _fit(cfg, tasks, loaded, encoder, stems, budget_s: float) -> tuple[dict[str, dict[str, float]], int]:
    import torch

    from polytask.config.build import build_model, restrict, trainer_kwargs
    from polytask.train.trainer import Trainer

    names = [t.name for t in tasks]
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tasks, encoder, {n: stems[n] for n in names} if stems else None)
    kwargs = trainer_kwargs(cfg)
    kwargs["callbacks"] = [*kwargs["callbacks"], TimeBudget(budget_s)]
    trainer = Trainer(model, tasks, **kwargs)
    data = [loaded.train, loaded.val, loaded.test]
    if len(tasks) < len(loaded.tasks):
        data = [restrict(d, names[0]) for d in data]
    report = trainer.fit(*data)
    return {t: report.metrics[t] for t in names}, int(report.summary.get("epochs_run", 0))


def run(p: Plan, *, echo: Callable[[str], None] = print) -> dict[CellKey, Cell]:
    """Train every unfinished cell of the plan, appending each to the CSV as it finishes."""
    import torch

    from polytask.cli.pipeline import prepare

    total = _count(p)
    todo = sum(1 for key, tasks in _keys(p) if not finished(p.cells, key, tasks))
    echo(f"bench quality ({p.suite.name}): {total} cells, {total - todo} finished in {p.csv_path}, {todo} to train")
    done = 0
    for dataset in p.datasets:
        spec = _spec(p, dataset)
        echo(f"{dataset}: {spec.describe()}")
        for seed in p.seeds:
            cfg = _config(spec, seed)
            keys = [(k, t) for k, t in _keys(p, [dataset], [seed]) if not finished(p.cells, k, t)]
            if not keys:
                continue
            loaded, encoder, _, _ = prepare(cfg)
            stems = loaded.encoder.get("_stems")
            tasks = {t.name: t for t in loaded.tasks}
            for key, _ in keys:
                done += 1
                started = time.perf_counter()
                torch.set_num_threads(1)
                if key.kind == "single_task":
                    metrics, epochs = _fit(cfg, [tasks[key.scope]], loaded, encoder, stems, spec.budget_s)
                elif key.kind == "reference":
                    from polytask.bench.reference import gradient_boosting

                    metrics, epochs = gradient_boosting(loaded, rounds=spec.reference_rounds, seed=seed,
                                                         leaves=spec.reference_leaves)
                elif key.architecture == "hard_sharing":
                    cfg_m = _config(spec, seed, extra=[f"method.name={key.method}"])
                    metrics, epochs = _fit(cfg_m, loaded.tasks, loaded, encoder, stems, spec.budget_s)
                else:
                    file = dict(spec.architectures)[key.architecture]
                    extra = _ARCHITECTURE_OVERRIDES.get(key.architecture, ()) if file == spec.config else ()
                    cfg_a = _config(spec, seed, file, [*extra, "method.name=equal"])
                    loaded_a, encoder_a, _, _ = prepare(cfg_a)
                    metrics, epochs = _fit(cfg_a, loaded_a.tasks, loaded_a, encoder_a, loaded_a.encoder.get("_stems"),
                                           spec.budget_s)
                cell = Cell(key, metrics, epochs, time.perf_counter() - started, spec.budget_s, tuple(metrics))
                append(p.csv_path, cell)
                p.cells[key] = cell
                main = {t.name: t.main_metric for t in loaded.tasks}
                shown = "  ".join(f"{t} {metrics[t][main[t]]:.4g}" for t in list(metrics)[:4])
                more = f" (+{len(metrics) - 4} tasks)" if len(metrics) > 4 else ""
                echo(f"[{total - todo + done}/{total}] {dataset} seed {seed} {_label(key)}: {shown}{more}  "
                     f"{epochs} epochs, {cell.seconds:.1f} s")
    return p.cells


def _label(key: CellKey) -> str:
    if key.kind == "single_task":
        return f"single-task {key.scope}"
    if key.kind == "reference":
        return key.method
    return key.method if key.architecture == "hard_sharing" else f"{key.architecture} ({key.method})"


def _keys(p: Plan, datasets: Sequence[str] | None = None, seeds: Sequence[int] | None = None
          ) -> list[tuple[CellKey, list[str]]]:
    """Every cell of the plan with the tasks it must hold to be finished."""
    out = []
    for dataset in datasets or p.datasets:
        spec = _spec(p, dataset)
        names = task_names(spec)
        for seed in seeds if seeds is not None else p.seeds:
            out += [(CellKey(dataset, "single_task", "equal", "hard_sharing", seed, t), [t]) for t in names]
            if spec.reference:
                out.append((CellKey(dataset, "reference", "lightgbm", "-", seed), names))
            methods = p.methods if p.methods is not None else spec.methods or p.suite.methods
            out += [(CellKey(dataset, "multi_task", m, "hard_sharing", seed), names) for m in methods]
            out += [(CellKey(dataset, "multi_task", "equal", a, seed), names) for a, _ in spec.architectures]
    return out


def _count(p: Plan) -> int:
    return len(_keys(p))


#: the tasks a loader gives when a config names none (the configs of the other data sets list theirs)
DEFAULT_TASKS = {"adult": ["income", "marital"], "multimnist": ["left", "right"], "reviews": ["sentiment", "topic"],
                 "movielens": ["click", "conversion"], "yeast": [f"class{i}" for i in range(1, 15)]}


def task_names(spec: DataSpec) -> list[str]:
    """The tasks of a data set's example config (without loading its data)."""
    raw = _yaml(spec.config)
    return list(raw.get("tasks") or {}) or DEFAULT_TASKS[raw["data"]["dataset"]]


def _yaml(file: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((EXAMPLES / file).read_text())


# ------------------------------------------------------------------------------------- results
@dataclass
class Row:
    """One line of a data set's table: the cells of one method / architecture over seeds."""

    label: str
    kind: str
    metrics: dict[str, list[float]]  # task → main test metric per seed
    delta_m: list[float]
    seconds: list[float]
    epochs: list[int]


def summarise(cells: dict[CellKey, Cell], dataset: str, main: dict[str, str]) -> tuple[list[Row], dict[int, dict]]:
    """Rows of one data set: single-task, reference, multi-task (Δm against the same seed's baselines)."""
    from polytask.metrics.delta_m import delta_m

    mine = [c for k, c in cells.items() if k.dataset == dataset]
    baselines: dict[int, dict[str, dict[str, float]]] = {}
    single_seconds: dict[int, float] = {}
    for cell in mine:
        if cell.key.kind == "single_task":
            baselines.setdefault(cell.key.seed, {}).update(cell.metrics)
            single_seconds[cell.key.seed] = single_seconds.get(cell.key.seed, 0.0) + cell.seconds
    complete = {s: b for s, b in baselines.items() if all(t in b for t in main)}
    rows: dict[tuple[str, str], Row] = {}
    if complete:
        rows[("single_task", "single-task")] = Row("single-task (one model per task)", "single_task",
                                                  {t: [complete[s][t][m] for s in sorted(complete)] for t, m in main.items()},
                                                  [0.0] * len(complete), [single_seconds[s] for s in sorted(complete)], [])
    for cell in sorted(mine, key=lambda c: c.key.seed):
        if cell.key.kind == "single_task" or cell.key.seed not in complete or not all(t in cell.metrics for t in main):
            continue
        label = _label(cell.key)
        row = rows.setdefault((cell.key.kind, label), Row(label, cell.key.kind, {t: [] for t in main}, [], [], []))
        for t, m in main.items():
            row.metrics[t].append(cell.metrics[t][m])
        row.delta_m.append(delta_m(cell.metrics, complete[cell.key.seed], main))
        row.seconds.append(cell.seconds)
        row.epochs.append(cell.epochs)
    order = {"single_task": 0, "reference": 1, "multi_task": 2}
    return sorted(rows.values(), key=lambda r: (order[r.kind], -_mean(r.delta_m) if r.kind == "multi_task" else 0)), complete


def _needs(row: Row) -> str:
    """What the row's method needs (``losses``: loss balancing, ``gramian`` / ``jacobian``: gradient methods)."""
    from polytask.methods import METHODS

    if row.kind != "multi_task":
        return "–"
    name = row.label.split("(")[-1].rstrip(")") if "(" in row.label else row.label
    return METHODS.get(name).needs if name in METHODS.names() else "–"


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def _pm(values: Sequence[float], digits: int = 4) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}g} ± {spread:.2g}"


def main_metrics(dataset: str) -> dict[str, str]:
    """Task → main metric in the data set's example config (its own metrics list, else the kind's default)."""
    import importlib

    from polytask.core.task import DEFAULT_METRICS

    spec = FULL.datasets[dataset]
    raw = _yaml(spec.config)
    listed = raw.get("tasks") or {}
    available = importlib.import_module(f"polytask.datasets.{raw['data']['dataset']}").AVAILABLE
    out = {}
    for name in task_names(spec):
        metrics = (listed.get(name) or {}).get("metrics")
        out[name] = metrics[0] if metrics else DEFAULT_METRICS[available[name].kind][0]
    return out


def markdown(cells: dict[CellKey, Cell], datasets: Sequence[str], *, csv_name: str, suite: Suite,
             statistics: tuple[Path, str] | None = None) -> str:
    """docs/benchmarks.md: a summary line per data set, then one table per data set."""
    from polytask.metrics.registry import METRICS

    lines = ["# Benchmarks: every method on the bundled real data sets", "",
             f"Generated by `polytask bench quality --suite {suite.name}` from [`{csv_name}`]({csv_name}); do not edit "
             "by hand (rerun the command: finished cells are read back, not retrained).", "",
             "Each cell is one training run; metrics are on the test split, mean ± standard deviation over seeds "
             "(each seed also draws the train/val/test split). Δm% is the mean relative change of each task's main "
             "metric against the single-task baselines of the same seed (positive: better than one model per task; "
             "Maninis et al., CVPR 2019). Methods run on hard sharing; architecture rows use equal weighting. "
             "The reference row is one LightGBM model per task, its number of trees and leaves chosen on the "
             "validation split. Seconds are wall time per cell on a shared, loaded 2-core machine (one thread), "
             "for comparing rows of one table only.", "",
             f"Suite `{suite.name}`: methods {', '.join(suite.methods)}" + (f"; {suite.note}" if suite.note else "")
             + ". The budget of each data set (example config, overrides, the wall-time cap per cell after which "
             "a cell stops at the end of its epoch) heads its table; the epochs column shows what each row ran.", "",
             "## Summary", "",
             "The best row is the multi-task row (method or architecture) with the highest mean Δm; choosing it "
             "on the test split flatters it, so read a small margin as a tie. The last two columns count the "
             "seeds in which the best row's Δm is above 0 (single-task) and above equal weighting's.", "",
             "| data set | tasks | best row | its Δm% | equal Δm% | best > single-task (seeds) | best > equal (seeds) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    sections = []
    for dataset in datasets:
        main = main_metrics(dataset)
        rows, complete = summarise(cells, dataset, main)
        multi = [r for r in rows if r.kind == "multi_task" and r.delta_m]
        if not multi:
            continue
        best = max(multi, key=lambda r: _mean(r.delta_m))
        equal = next((r for r in multi if r.label == "equal"), None)
        wins = "–"
        if equal is not None and equal is not best and len(equal.delta_m) == len(best.delta_m):
            wins = f"{sum(b > e for b, e in zip(best.delta_m, equal.delta_m))} / {len(best.delta_m)}"
        above = f"{sum(d > 0 for d in best.delta_m)} / {len(best.delta_m)}"
        lines.append(f"| {dataset} | {len(main)} | {best.label} | {_pm(best.delta_m, 3)} | "
                     f"{_pm(equal.delta_m, 3) if equal else '–'} | {above} | {wins} |")
        spec = FULL.datasets[dataset] if dataset not in suite.datasets else suite.datasets[dataset]
        shown = list(main)
        header = " | ".join(f"{t} {main[t]} {'↑' if METRICS.higher_is_better(main[t]) else '↓'}" for t in shown)
        extra_columns: dict[str, dict[str, list[float]]] = {}
        if spec.alt_metric:  # the same cells scored on another metric every task records
            extra_columns[spec.alt_metric] = {
                r.label: r.delta_m for r in summarise(cells, dataset, {t: spec.alt_metric for t in main})[0]}
        for group, members in spec.task_groups:
            extra_columns[group] = {r.label: r.delta_m for r in summarise(cells, dataset, {t: main[t] for t in members})[0]}
        alt_head = "".join(f" Δm% ({name}) |" for name in extra_columns)
        sections += ["", f"## {dataset}", "", f"Budget: {spec.describe()}; seeds {sorted(complete)}.", "",
                     f"| row | needs | Δm% |{alt_head} {header} | s/cell | epochs / trees |",
                     "| --- | --- | --- | " + "--- | " * len(extra_columns) + " | ".join("---" for _ in shown) + " | --- | --- |"]
        for r in rows:
            delta = "0 (reference point)" if r.kind == "single_task" else _pm(r.delta_m, 3)
            for column in extra_columns.values():
                delta += " | " + ("0" if r.kind == "single_task" else _pm(column.get(r.label, []), 3))
            epochs = f"{min(r.epochs)}–{max(r.epochs)}" if r.epochs and min(r.epochs) != max(r.epochs) else (
                str(r.epochs[0]) if r.epochs else "–")
            sections.append(f"| {r.label} | {_needs(r)} | {delta} | " + " | ".join(_pm(r.metrics[t]) for t in shown)
                            + f" | {_mean(r.seconds):.1f} | {epochs} |")
    extra = cost_table(cells, datasets)
    extra += statistics_table(*statistics) if statistics else []
    return "\n".join(lines + extra + sections) + "\n"


# ------------------------------------------------------------------------------- task statistics
STATISTICS_FIELDS = ("dataset", "train_rows", "tasks", "inputs", "mean_nmi", "max_nmi", "max_pair")


def normalized_mutual_information(a: Any, b: Any) -> float:
    """NMI(a, b) = I(a; b) / √(H(a) H(b)) of two label vectors (0 when either is constant)."""
    import numpy as np

    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    joint = np.zeros((ia.max() + 1, ib.max() + 1))
    np.add.at(joint, (ia, ib), 1.0)
    joint /= joint.sum()
    pa, pb = joint.sum(1), joint.sum(0)
    nz = joint > 0
    mutual = float((joint[nz] * np.log(joint[nz] / np.outer(pa, pb)[nz])).sum())
    ha, hb = float(-(pa[pa > 0] * np.log(pa[pa > 0])).sum()), float(-(pb[pb > 0] * np.log(pb[pb > 0])).sum())
    return mutual / math.sqrt(ha * hb) if ha > 0 and hb > 0 else 0.0


def task_statistics(dataset: str, seed: int = 0) -> dict[str, Any]:
    """How related a data set's tasks are on its training split: the mean and largest pairwise
    NMI of their labels (regression targets cut into deciles first), with the sizes."""
    import numpy as np

    from polytask.cli.pipeline import prepare

    spec = FULL.datasets[dataset]
    loaded, _, _, _ = prepare(_config(spec, seed))
    labels = {}
    for task in loaded.tasks:
        y = loaded.train.targets[task.name].numpy()
        if task.kind == "regression":
            y = np.searchsorted(np.quantile(y, np.linspace(0.1, 0.9, 9)), y)
        labels[task.name] = y
    names = list(labels)
    pairs = {(a, b): normalized_mutual_information(labels[a], labels[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    top = max(pairs, key=pairs.__getitem__)
    inputs = int(np.prod(loaded.input_shape))
    return {"dataset": dataset, "train_rows": len(loaded.train), "tasks": len(names), "inputs": inputs,
            "mean_nmi": f"{statistics.fmean(pairs.values()):.4f}", "max_nmi": f"{pairs[top]:.4f}", "max_pair": "/".join(top)}


def statistics_table(path: Path, link: str) -> list[str]:
    """Markdown lines from the task-statistics CSV (none when it is missing)."""
    import csv

    if not path.exists():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    lines = ["", "## How related the tasks are", "",
             f"From [`{path.name}`]({link}) (`polytask bench quality --task-statistics`): pairwise "
             "normalised mutual information of the task labels on the training split of seed 0 (regression targets "
             "cut into deciles), 0 = independent, 1 = one label determines the other.", "",
             "| data set | training rows | tasks | input size | mean NMI | largest NMI (pair) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['dataset']} | {r['train_rows']} | {r['tasks']} | {r['inputs']} | {r['mean_nmi']} | "
              f"{r['max_nmi']} ({r['max_pair']}) |" for r in rows]
    return lines


def cost_table(cells: dict[CellKey, Cell], datasets: Sequence[str]) -> list[str]:
    """Markdown lines: each method's wall time per cell over equal weighting's (same data set and
    seed, so both ran the same epochs on the same rows), the median over seeds, per data set."""
    ratios: dict[str, dict[str, list[float]]] = {}
    for key, cell in cells.items():
        if key.kind != "multi_task" or key.architecture != "hard_sharing" or key.method == "equal":
            continue
        equal = cells.get(CellKey(key.dataset, "multi_task", "equal", "hard_sharing", key.seed))
        if equal is None or equal.seconds <= 0 or cell.epochs != equal.epochs:
            continue
        ratios.setdefault(key.method, {}).setdefault(key.dataset, []).append(cell.seconds / equal.seconds)
    if not ratios:
        return []
    shown = [d for d in datasets if any(d in r for r in ratios.values())]
    lines = ["", "## Cost", "",
             "Wall time of a cell over equal weighting's on the same data set and seed (same epochs, rows and "
             "batches), median over seeds; it includes data loading and evaluation, so it understates the cost "
             "of a training step. The machine was shared and loaded: read ratios, not seconds.", "",
             "| method | needs | " + " | ".join(shown) + " |", "| --- | --- | " + " | ".join("---" for _ in shown) + " |"]
    from polytask.methods import METHODS

    for method in sorted(ratios, key=lambda m: statistics.median([statistics.median(v) for v in ratios[m].values()])):
        values = [f"{statistics.median(ratios[method][d]):.1f}×" if d in ratios[method] else "–" for d in shown]
        lines.append(f"| {method} | {METHODS.get(method).needs} | " + " | ".join(values) + " |")
    return lines
