"""Interleaved step timing for docs/method_guide.md: the methods of `polytask bench quality`, one
process, rounds of one step per method (order rotated each round), medians. The machine is shared:
interleaving makes a load change hit every method alike, so the ratios hold where the
milliseconds do not. Usage: python bench_quality_interleaved_speed.py OUT.csv"""
import csv
import statistics
import sys
import time

import torch

from polytask.bench.speed import equal_step, jacobian_step, make_problem, method_step

METHODS = ["uncertainty", "famo", "rlw", "dwa", "gls", "db_mtl", "nash_mtl", "upgrad", "fairgrad", "imtl_g",
           "aligned_mtl", "mgda", "pcgrad", "cagrad"]
torch.set_num_threads(1)
rows = []
for tasks, rounds in ((2, 9), (12, 7)):
    problem = make_problem("mlp", tasks, torch.device("cpu"))
    steps = {"(equal)": equal_step(problem), "(jacobian)": jacobian_step(problem)}
    steps.update({n: method_step(problem, n, "auto", 1) for n in METHODS})
    names = list(steps)
    times = {n: [] for n in names}
    for r in range(rounds + 2):  # two warm-up rounds
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start = time.perf_counter()
            steps[name](r)
            if r >= 2:
                times[name].append(time.perf_counter() - start)
    equal, jac = statistics.median(times["(equal)"]), statistics.median(times["(jacobian)"])
    for name in names:
        ms = statistics.median(times[name])
        rows.append({"tasks": tasks, "method": name, "ms_per_step": f"{1000 * ms:.1f}", "x_equal": f"{ms / equal:.2f}",
                     "x_jacobian": f"{ms / jac:.2f}"})
        print(tasks, name, rows[-1]["ms_per_step"], rows[-1]["x_equal"], rows[-1]["x_jacobian"], flush=True)
with open(sys.argv[1], "w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
