"""ESMM, MMoE, PLE and AITM on the MovieLens-100K click → conversion funnel (issue 16).

Each cell is ``polytask train examples/movielens_esmm.yaml`` with the architecture swapped by
``--set`` (same tabular encoder, head, optimiser, epochs), 3 seeds (the seed also draws the
sampled unclicked impressions and the split). Writes issue16_funnel.csv (one row per run) and
issue16_funnel.md (mean ± std of test AUROC per task). Run from the repository root:

    nice -n 10 .venv/bin/python docs/results/issue16_funnel.py
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
EPOCHS = 3
CELLS = {  # label → overrides
    "esmm": ["model.architecture=esmm"],
    "mmoe": ["model.architecture=mmoe", "model.options.num_experts=4"],
    "ple": ["model.architecture=ple", "model.options.levels=2"],
    "aitm": ["model.architecture=aitm"],
    "aitm (α=0, no calibrator)": ["model.architecture=aitm", "model.options.calibration_weight=0.0"],
}
TASKS = ("click", "conversion")


def run(label: str, overrides: list[str], seed: int) -> dict[str, object]:
    folder = ROOT / "runs" / "issue16_funnel" / f"{label.split()[0]}{'_a0' if 'α=0' in label else ''}_s{seed}"
    cmd = [sys.executable, "-m", "polytask", "train", str(ROOT / "examples" / "movielens_esmm.yaml"), "--quiet", "--overwrite",
           "--set", f"seed={seed}", "--set", f"train.epochs={EPOCHS}", "--set", f"output_dir={folder}"]
    for o in overrides:
        cmd += ["--set", o]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    summary = json.loads((folder / "summary.json").read_text())
    row: dict[str, object] = {"model": label, "seed": seed, "train_seconds": summary["train_seconds"],
                              "wall_seconds": round(time.perf_counter() - start, 1)}
    for t in TASKS:
        row[f"{t}_auroc"] = round(summary["tasks"][t]["auroc"], 4)
        row[f"{t}_loss"] = round(summary["tasks"][t]["loss"], 4)
    return row


def main() -> None:
    rows = []
    for label, overrides in CELLS.items():
        for seed in SEEDS:
            rows.append(run(label, overrides, seed))
            print(rows[-1], flush=True)
    with (OUT / "issue16_funnel.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"MovieLens-100K funnel (movielens_esmm.yaml: click = rated vs 1 sampled unrated movie per rating, "
             f"conversion = rated >= 4, over all impressions), {EPOCHS} epochs, seeds {list(SEEDS)}, test split; "
             "mean ± std over seeds. Training seconds on a loaded 2-core machine (other jobs running).", "",
             "| model | click AUROC | conversion AUROC | click loss | conversion loss | train s |", "|---|---|---|---|---|---|"]
    for label in CELLS:
        mine = [r for r in rows if r["model"] == label]

        def stat(key: str, digits: int = 4) -> str:
            values = [float(r[key]) for r in mine]  # noqa: B023
            return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

        lines.append(f"| {label} | {stat('click_auroc')} | {stat('conversion_auroc')} | {stat('click_loss')} | "
                     f"{stat('conversion_loss')} | {statistics.mean(float(r['train_seconds']) for r in mine):.1f} |")
    (OUT / "issue16_funnel.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
