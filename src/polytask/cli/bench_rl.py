"""`polytask bench rl`: shared MLP, one-hot MLP, CARE and CARE + PCGrad on the pendulum family, 3 seeds."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any, bench_sub: Any) -> None:
    rl = bench_sub.add_parser(
        "rl", help="multi-task SAC encoders (shared MLP, one-hot MLP, CARE, CARE + PCGrad) on the pendulum family: "
        "per-task return after a fixed budget, mean ± std over seeds; resumable CSV + markdown table")
    rl.add_argument("--quick", action="store_true", help="a smoke run of every arm in seconds (2 tasks, 400 steps, 1 seed)")
    rl.add_argument("--arms", help="comma list of shared_mlp, onehot_mlp, care, care+pcgrad (default: all)")
    rl.add_argument("--seeds", help="number of seeds 0..N-1 (default: 3; --quick: 1), or a comma list of seeds (e.g. 1,2: "
                    "two processes can share one CSV)")
    rl.add_argument("--steps", type=int, help="environment steps per run, a multiple of 200 (default: 4000)")
    rl.add_argument("--csv", type=Path, help="results, appended cell by cell; finished cells are not rerun (default: "
                    "docs/results/bench_rl.csv, --quick: runs/bench_rl_quick.csv)")
    rl.add_argument("--markdown", type=Path, help="table to write (default: docs/results/bench_rl.md, --quick: "
                    "runs/bench_rl_quick.md)")
    rl.add_argument("--table-only", action="store_true", help="write the table from the CSV without training")
    rl.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import os

    import torch

    from polytask.bench import rl

    torch.set_num_threads(1)  # small networks: one thread per process is fastest on a shared machine
    quick = args.quick
    csv_path = args.csv or Path("runs/bench_rl_quick.csv" if quick else "docs/results/bench_rl.csv")
    md_path = args.markdown or Path("runs/bench_rl_quick.md" if quick else "docs/results/bench_rl.md")
    arms = [a.strip() for a in args.arms.split(",") if a.strip()] if args.arms else None
    seeds = None if args.seeds is None else int(args.seeds) if "," not in args.seeds else [
        int(s) for s in args.seeds.split(",") if s.strip()]
    plan = rl.plan("quick" if quick else "full", arms, seeds, csv_path, args.steps)
    cells = plan.cells if args.table_only else rl.run(plan, echo=lambda line: print(line, flush=True))
    md_path.parent.mkdir(parents=True, exist_ok=True)
    load = ""
    if hasattr(os, "getloadavg") and not args.table_only:
        load = f"machine load (1-min average) {os.getloadavg()[0]:.1f} at the end"
    md_path.write_text(rl.markdown(cells, plan, csv_name=os.path.relpath(csv_path.resolve(), md_path.resolve().parent),
                                   load=load))
    print(f"wrote {md_path} ({len(cells)} cells from {csv_path})")
    return 0
