"""Does TAG's grouping advice beat training all tasks together? (issue 13)

For each data set and seed: train all tasks together with the diagnostics callback (TAG affinity
every 10 steps) and single-task baselines (`--baselines`); take the best split into at most 2
groups from the seed-0 run's affinity (`polytask inspect --groups 2 --write-configs`); train every
group of two or more tasks with the same seed (a group of one is its single-task baseline); Δm of
the grouped models against the same baselines. Writes docs/results/diagnostics_grouping.csv and
the affinity matrices to docs/results/diagnostics_affinity.json.
Run: OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python docs/results/diagnostics_grouping.py
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch
import yaml

from polytask.cli.diagnose import matrix_of, write_group_configs
from polytask.cli.main import main
from polytask.diagnostics.grouping import best_grouping
from polytask.metrics.delta_m import delta_m

torch.set_num_threads(1)
HERE = Path(__file__).parent
ROOT = Path("runs/diagnostics")
SETUPS = {
    "adult3": ["examples/adult.yaml", "--set", "tasks.hours={kind: regression}"],
    "multimnist": ["examples/multimnist.yaml", "--set", "train.epochs=3",
                   "--set", "data.options={train_size: 6000, val_size: 1000, test_size: 2000}"],
}
DIAG = ["--set", "callbacks=[{name: diagnostics, affinity_every: 10}]", "--set", "health.every=10"]


def summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def experiment(setup: str, seeds: list[int]) -> list[dict]:
    rows, matrices = [], {}
    groups = None
    for seed in seeds:
        together = ROOT / f"{setup}-all-s{seed}"
        if not (together / "summary.json").exists():
            assert main(["train", *SETUPS[setup], *DIAG, "--set", f"seed={seed}", "--set", f"output_dir={together}",
                         "--baselines", "--overwrite", "--quiet"]) == 0
        s = summary(together)
        tasks, matrix, name = matrix_of(together, "affinity")
        matrices[f"{setup}-s{seed}"] = {"tasks": tasks, "affinity": matrix,
                                        "cosine": matrix_of(together, "cosine")[1]}
        if groups is None:  # TAG: measure once (seed 0), then train the proposed groups
            grouping = best_grouping(matrix, tasks, 2)
            groups = grouping.groups
            matrices[f"{setup}-s{seed}"]["groups_B2"] = [list(g) for g in groups]
            matrices[f"{setup}-s{seed}"]["score_B2"] = grouping.total
        combined = {}
        for number, path in enumerate(write_group_configs(together, groups, ROOT / f"{setup}-configs-s{seed}"), start=1):
            group = groups[number - 1]
            if len(group) == 1:  # a group of one is the task trained alone: its baseline
                combined[group[0]] = s["baselines"][group[0]]
                continue
            out = ROOT / f"{setup}-group{number}-s{seed}"
            if not (out / "summary.json").exists():
                config = yaml.safe_load(path.read_text())
                config["callbacks"], config["output_dir"] = [], str(out)
                path.write_text(yaml.safe_dump(config, sort_keys=False))
                assert main(["train", str(path), "--overwrite", "--quiet"]) == 0
            combined.update(summary(out)["tasks"])
        grouped = delta_m(combined, s["baselines"], s["main_metrics"])
        row = {"setup": setup, "seed": seed, "groups": " | ".join(", ".join(g) for g in groups),
               "delta_m_all_together": round(s["delta_m"], 3), "delta_m_grouped": round(grouped, 3)}
        for task, metric in s["main_metrics"].items():
            row[f"{task}_{metric}_all"] = round(s["tasks"][task][metric], 4)
            row[f"{task}_{metric}_grouped"] = round(combined[task][metric], 4)
            row[f"{task}_{metric}_single"] = round(s["baselines"][task][metric], 4)
        rows.append(row)
        print(row, flush=True)
    path = HERE / "diagnostics_affinity.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    saved.update(matrices)
    path.write_text(json.dumps(saved, indent=1))
    return rows


if __name__ == "__main__":
    wanted = sys.argv[1:] or list(SETUPS)
    out = HERE / "diagnostics_grouping.csv"
    old = [r for r in csv.DictReader(out.open())] if out.exists() else []
    rows = [r for r in old if r["setup"] not in wanted]
    for setup in wanted:
        rows += experiment(setup, [0, 1, 2])
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
