"""Adult with three tasks: the affinity task scheduler and the bandit's two rewards against all tasks at every step.

Same config, seeds and single-task baselines as diagnostics_grouping.py (its runs must exist:
runs/diagnostics/adult3-all-s{seed}); Δm of each scheduler's run against those baselines.
Writes docs/results/diagnostics_scheduling.csv.
Run: OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python docs/results/diagnostics_scheduling.py
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from polytask.cli.main import main
from polytask.metrics.delta_m import delta_m

torch.set_num_threads(1)
ROOT = Path("runs/diagnostics")
BASE = ["examples/adult.yaml", "--set", "tasks.hours={kind: regression}"]
SCHEDULERS = {
    "affinity": ["--set", "task_scheduler={name: affinity, groups: 2}",
                 "--set", "callbacks=[{name: diagnostics, affinity_every: 10}]"],
    "bandit_train": ["--set", "task_scheduler={name: bandit, k: 2}"],
    "bandit_validation": ["--set", "task_scheduler={name: bandit, k: 2, reward: validation, lr: 1.0}",
                          "--set", "callbacks=[{name: diagnostics, affinity_every: 0}]"],
}

rows = []
for seed in (0, 1, 2):
    together = json.loads((ROOT / f"adult3-all-s{seed}" / "summary.json").read_text())
    rows.append({"seed": seed, "scheduler": "all", "delta_m": round(together["delta_m"], 3)})
    for name, args in SCHEDULERS.items():
        out = ROOT / f"adult3-{name}-s{seed}"
        if not (out / "summary.json").exists():
            assert main(["train", *BASE, *args, "--set", f"seed={seed}", "--set", f"output_dir={out}", "--overwrite",
                         "--quiet"]) == 0
        s = json.loads((out / "summary.json").read_text())
        steps = list(csv.DictReader((out / "steps.csv").open()))
        per_task = {t: sum(1 for r in steps if r["task"] == t) for t in together["main_metrics"]}
        rows.append({"seed": seed, "scheduler": name,
                     "delta_m": round(delta_m(s["tasks"], together["baselines"], together["main_metrics"]), 3),
                     **{f"steps_{t}": n for t, n in per_task.items()}})
        print(rows[-1], flush=True)
out = Path(__file__).with_name("diagnostics_scheduling.csv")
fields = list(dict.fromkeys(k for r in rows for k in r))
with out.open("w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
