"""`polytask bench quality`: every method on every bundled real data set, Δm% against single-task baselines."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any, bench_sub: Any) -> None:
    quality = bench_sub.add_parser(
        "quality", help="single-task baselines, equal weighting, each method and the main architectures on the bundled "
        "real data sets: test metrics ± std and Δm%% over seeds; resumable CSV + markdown table")
    quality.add_argument("--suite", default="quick", choices=("quick", "full"),
                         help="quick: a smoke run in seconds; full: the documented benchmark (about an hour on 2 cores)")
    quality.add_argument("--datasets", help="comma list (default: the suite's); any of adult, diamonds, qm9, yeast, "
                         "multimnist, reviews, movielens")
    quality.add_argument("--methods", help="comma list of method names, or all (default: the suite's)")
    quality.add_argument("--seeds", type=int, help="number of seeds 0..N-1 (default: the suite's; full: 3)")
    quality.add_argument("--csv", type=Path, help="results, appended cell by cell; finished cells are not rerun "
                         "(default: docs/results/bench_quality_SUITE.csv for full, runs/bench_quality_quick.csv for quick)")
    quality.add_argument("--markdown", type=Path, help="table to write (default: docs/benchmarks.md for full, "
                         "runs/bench_quality_quick.md for quick)")
    quality.add_argument("--table-only", action="store_true", help="write the table from the CSV without training")
    quality.add_argument("--task-statistics", action="store_true",
                         help="also measure how related each data set's tasks are (pairwise NMI of the labels) into "
                         "bench_quality_tasks.csv beside the results CSV; the table shows it")
    quality.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import csv

    from polytask.bench import quality

    def names(text: str | None) -> list[str] | None:
        return [n.strip() for n in text.split(",") if n.strip()] if text else None

    csv_path = args.csv or (Path("docs/results/bench_quality_full.csv") if args.suite == "full"
                            else Path("runs/bench_quality_quick.csv"))
    md_path = args.markdown or (Path("docs/benchmarks.md") if args.suite == "full" else Path("runs/bench_quality_quick.md"))
    plan = quality.plan(args.suite, names(args.datasets), names(args.methods), args.seeds, csv_path)
    cells = plan.cells if args.table_only else quality.run(plan, echo=lambda line: print(line, flush=True))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    shown = [d for d in quality.FULL.datasets if any(k.dataset == d for k in cells)]
    stats_path = csv_path.with_name("bench_quality_tasks.csv")
    if args.task_statistics:
        rows = [quality.task_statistics(d) for d in shown or plan.datasets]
        with stats_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=quality.STATISTICS_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {stats_path}")
    relative = _relative(csv_path.resolve(), md_path.resolve().parent)
    statistics = (stats_path, _relative(stats_path.resolve(), md_path.resolve().parent)) if stats_path.exists() else None
    md_path.write_text(quality.markdown(cells, shown, csv_name=relative, suite=plan.suite, statistics=statistics))
    print(f"wrote {md_path} ({len(cells)} cells from {csv_path})")
    return 0


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start)
