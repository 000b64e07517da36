"""The three YAML routes of issue 16 (pretrained_text, auxiliary task, fused), each trained from its
example file through the CLI (`polytask train`), seeds 0–2; test split. Writes issue16_yaml_routes.csv
and issue16_yaml_routes.md. Run from the repository root:

    POLYTASK_CACHE=runs/issue16_routes nice -n 10 .venv/bin/python docs/results/issue16_yaml_routes.py [PART ...]

PART: pretrained, auxiliary, fused (default: all). Every example draws the same 3,000 reviews
(``subset_seed: 0``) as docs/results/issue16_text.py and issue16_fusion.py; the seed changes the
split and the initialisation. Rating RMSE is given in stars (the loader's standardised RMSE times
the rating's standard deviation on the training split).
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from polytask.cli.main import main as cli  # noqa: E402
from polytask.datasets.base import split_indices  # noqa: E402
from polytask.datasets.reviews import DEPARTMENTS, REVIEWS_FILE  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).resolve().parent
RUNS = ROOT / "runs" / "issue16_yaml_routes"
SEEDS = (0, 1, 2)
ROWS = 3000

AUXILIARY = {  # the auxiliary example with and without its auxiliary task(s)
    "rating alone (300 labels)": ["tasks={rating: {}}"],
    "rating + sentiment (all rows)": [],
    "rating + topic (all rows)": ["tasks={rating: {}, topic: {}}"],
    "rating + sentiment + topic": ["tasks={rating: {}, sentiment: {}, topic: {}}"],
}
BAG = ["model.encoder={name: text, kind: bag, embedding_dim: 64, out_features: 64}",
       "data.options={max_length: 100, max_rows: 3000, subset_seed: 0, task_rows: {rating: 300}}"]
FUSED = {
    "text only (bag)": ["data.options={inputs: text, max_rows: 3000, subset_seed: 0, max_length: 100}",
                        "model.encoder={name: text, kind: bag, embedding_dim: 64, out_features: 64}"],
    "tabular only (age, feedback, department)": ["data.options={inputs: tabular, max_rows: 3000, subset_seed: 0}",
                                                 "model.encoder={name: tabular, hidden: [32]}"],
    "fused concat": ["model.encoder.fusion=concat"],
    "fused gated": [],
}


def rating_std(seed: int) -> float:
    """The rating's standard deviation (stars) on the training split the loader draws for ``seed``."""
    frame = pd.read_parquet(REVIEWS_FILE.path(False))
    title, review = (frame[c].fillna("").astype(str) for c in ("Title", "Review Text"))
    keep = ((title.str.strip() != "") | (review.str.strip() != "")) & frame["Department Name"].isin(DEPARTMENTS)
    frame = frame[keep].reset_index(drop=True)
    pick = torch.randperm(len(frame), generator=torch.Generator().manual_seed(0))[:ROWS].sort().values.numpy()
    rating = torch.tensor(frame.iloc[pick]["Rating"].to_numpy(dtype="float32"))
    train, _, _ = split_indices(ROWS, (0.15, 0.15), seed)
    return float(rating[train].std())


def train(example: str, label: str, seed: int, sets: list[str]) -> dict:
    folder = RUNS / example.removesuffix(".yaml") / label.replace(" ", "_").replace("/", "") / f"seed{seed}"
    args = ["train", str(ROOT / "examples" / example), "--quiet", "--set", f"seed={seed}", "--set", f"output_dir={folder}"]
    for s in sets:
        args += ["--set", s]
    start = time.perf_counter()
    if cli(args) != 0:
        raise SystemExit(f"training failed: {args}")
    summary = json.loads((folder / "summary.json").read_text())
    metrics = summary["tasks"]
    row = {"example": example, "model": label, "seed": seed, "train_seconds": round(summary["train_seconds"], 1),
           "wall_seconds": round(time.perf_counter() - start, 1), "best_epoch": summary["best_epoch"]}
    if "sentiment" in metrics:
        row["sentiment_auroc"] = round(metrics["sentiment"]["auroc"], 4)
    if "topic" in metrics:
        row["topic_accuracy"] = round(metrics["topic"]["accuracy"], 4)
    if "rating" in metrics:
        row["rating_rmse_stars"] = round(metrics["rating"]["rmse"] * rating_std(seed), 4)
    print(row, flush=True)
    return row


def table(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    lines = ["| model | " + " | ".join(title for _, title in columns) + " | train s |",
             "|---|" + "---|" * (len(columns) + 1)]
    for label in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == label]

        def stat(key: str) -> str:
            values = [float(r[key]) for r in mine if key in r]  # noqa: B023
            if not values:
                return "—"
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{values[0]:.3f}"

        seconds = statistics.mean(float(r["train_seconds"]) for r in mine)
        lines.append(f"| {label} | " + " | ".join(stat(k) for k, _ in columns) + f" | {seconds:.0f} |")
    return lines


def main() -> None:
    parts = sys.argv[1:] or ["pretrained", "auxiliary", "fused"]
    rows: list[dict] = []
    md: list[str] = [f"Seeds {list(SEEDS)}, test split, mean ± std; the same 3,000 reviews for every seed "
                     "(subset_seed: 0); rating RMSE in stars; 1 thread, loaded machine (seconds indicative).", ""]
    if "pretrained" in parts:
        mine = [train("reviews_pretrained.yaml", "pretrained_text frozen (YAML)", s, []) for s in SEEDS]
        rows += mine
        md += ["## examples/reviews_pretrained.yaml", ""]
        md += table(mine, [("sentiment_auroc", "sentiment AUROC"), ("topic_accuracy", "topic accuracy"),
                           ("rating_rmse_stars", "rating RMSE")]) + [""]
    if "auxiliary" in parts:
        mine = []
        for label, sets in AUXILIARY.items():
            mine += [train("reviews_auxiliary.yaml", f"pretrained_text: {label}", s, sets) for s in SEEDS]
        for label in ("rating alone (300 labels)", "rating + sentiment (all rows)"):
            mine += [train("reviews_auxiliary.yaml", f"text bag: {label}", s, BAG + AUXILIARY[label]) for s in SEEDS]
        rows += mine
        md += ["## examples/reviews_auxiliary.yaml (main task rating, 300 labelled training reviews)", ""]
        md += table(mine, [("rating_rmse_stars", "rating RMSE (main)"), ("sentiment_auroc", "sentiment AUROC"),
                           ("topic_accuracy", "topic accuracy")]) + [""]
    if "fused" in parts:
        mine = []
        for label, sets in FUSED.items():
            mine += [train("reviews_fused.yaml", label, s, sets) for s in SEEDS]
        rows += mine
        md += ["## examples/reviews_fused.yaml and each modality alone", ""]
        md += table(mine, [("sentiment_auroc", "sentiment AUROC"), ("rating_rmse_stars", "rating RMSE")]) + [""]
    fields = ["example", "model", "seed", "sentiment_auroc", "topic_accuracy", "rating_rmse_stars", "best_epoch",
              "train_seconds", "wall_seconds"]
    name = "issue16_yaml_routes" + ("" if len(parts) == 3 else "_" + "_".join(parts))
    with (OUT / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    (OUT / f"{name}.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
