"""Overhead of the diagnostics callback's TAG affinity at k = 10 and k = 100 (issue 13).

One process, repetitions interleaved (none, k=10, k=100, none, ...), the median of each
variant's training time (summary.json train_seconds: the fit, without data loading) and of the
time spent inside the diagnostics callback's hooks (timed around each hook: the direct cost,
free of the load other processes put on the machine between runs). Writes
docs/results/diagnostics_overhead.csv. Run: OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python docs/results/diagnostics_overhead.py
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from polytask.cli.main import main
from polytask.train.callbacks.diagnostics import Diagnostics

torch.set_num_threads(1)
OUT = Path(__file__).with_name("diagnostics_overhead.csv")
SETUPS = {
    "adult3": ["examples/adult.yaml", "--set", "tasks.hours={kind: regression}", "--set", "train.epochs=3"],
    "multimnist": ["examples/multimnist.yaml", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=100",
                   "--set", "data.options={train_size: 4000, val_size: 500, test_size: 500}"],
}
VARIANTS = {"none": [], "k10": ["--set", "callbacks=[{name: diagnostics, affinity_every: 10}]"],
            "k100": ["--set", "callbacks=[{name: diagnostics, affinity_every: 100}]"]}


SPENT = [0.0]


def _timed(hook):
    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return hook(*args, **kwargs)
        finally:
            SPENT[0] += time.perf_counter() - started
    return timed


for _hook in ("on_fit_start", "on_step_end", "on_epoch_end"):
    setattr(Diagnostics, _hook, _timed(getattr(Diagnostics, _hook)))


def run(setup: str, variant: str, folder: Path) -> tuple[float, float, float]:
    out = folder / f"{setup}-{variant}"
    args = ["train", *SETUPS[setup], *VARIANTS[variant], "--set", f"output_dir={out}", "--set", "run.progress=false",
            "--overwrite", "--quiet"]
    SPENT[0] = 0.0
    assert main(args) == 0
    seconds = json.loads((out / "summary.json").read_text())["train_seconds"]
    diag = out / "diagnostics" / "summary.json"
    affinity = json.loads(diag.read_text())["affinity"]["seconds"] if diag.exists() else 0.0
    return seconds, affinity, SPENT[0]


def measure(reps: int) -> None:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for setup in SETUPS:
            times: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
            run(setup, "none", Path(tmp))  # warm-up
            for _ in range(reps):
                for variant in VARIANTS:
                    times[variant].append(run(setup, variant, Path(tmp)))
            base = statistics.median(t for t, _, _ in times["none"])
            for variant, values in times.items():
                median = statistics.median(t for t, _, _ in values)
                hooks = statistics.median(c for _, _, c in values)
                rows.append({"setup": setup, "variant": variant, "reps": reps, "median_train_s": round(median, 3),
                             "median_affinity_s": round(statistics.median(a for _, a, _ in values), 3),
                             "median_callback_s": round(hooks, 3), "callback_vs_none": round(hooks / base, 4),
                             "end_to_end_vs_none": round(median / base - 1, 4)})
                print(rows[-1], flush=True)
    with OUT.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    measure(int(sys.argv[1]) if len(sys.argv) > 1 else 5)
