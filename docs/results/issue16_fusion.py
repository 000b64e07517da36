"""Encoder `fused` (review text + reviewer age, feedback count and department) against each modality alone (issue 16).

The clothing reviews subset of issue16_text.py (3,000 rows drawn once, seed 0); tasks sentiment
(recommended) and rating. Input table: 100 word ids (polytask's vocabulary on the training split,
`text` bag encoder), then age and log(1 + positive feedback count), standardised on the training
split, and the department code (`tabular` encoder), then the text's presence flag. The fused
models train with 20 % of the training texts dropped at random (flag 0) so that they learn the
missing case; they are scored on the full test split and on the test split with every text
removed (against the tabular model). Writes issue16_fusion.csv and issue16_fusion.md:

    nice -n 10 .venv/bin/python docs/results/issue16_fusion.py
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import polytask as pt  # noqa: E402
from polytask.data.text import Vocabulary  # noqa: E402
from polytask.datasets.base import split_indices  # noqa: E402
from polytask.datasets.reviews import AVAILABLE, DEPARTMENTS, REVIEWS_FILE  # noqa: E402
from polytask.models.encoders import Fused, Tabular, Text  # noqa: E402

OUT = Path(__file__).resolve().parent
ROWS, SEEDS, EPOCHS, LENGTH, DROP = 3000, (0, 1, 2), 8, 100, 0.2
TASKS = [AVAILABLE["sentiment"], AVAILABLE["rating"]]


def frame_subset() -> tuple[pd.DataFrame, list[str]]:
    frame = pd.read_parquet(REVIEWS_FILE.path(False))
    text = frame["Title"].fillna("").astype(str) + " . " + frame["Review Text"].fillna("").astype(str)
    keep = (frame["Review Text"].notna() | frame["Title"].notna()) & frame["Department Name"].isin(DEPARTMENTS)
    frame, text = frame[keep].reset_index(drop=True), text[keep].reset_index(drop=True)
    pick = torch.randperm(len(frame), generator=torch.Generator().manual_seed(0))[:ROWS].sort().values.numpy()
    return frame.iloc[pick].reset_index(drop=True), text.iloc[pick].tolist()


def main() -> None:
    torch.set_num_threads(1)
    frame, texts = frame_subset()
    rating = torch.tensor(frame["Rating"].to_numpy(), dtype=torch.float32)
    sentiment = torch.tensor(frame["Recommended IND"].to_numpy(), dtype=torch.float32)
    numbers = torch.tensor(frame[["Age", "Positive Feedback Count"]].to_numpy(), dtype=torch.float32)
    numbers[:, 1] = torch.log1p(numbers[:, 1])
    department = torch.tensor(pd.Categorical(frame["Department Name"], categories=DEPARTMENTS).codes, dtype=torch.float32)
    rows = []
    for seed in SEEDS:
        tr, va, te = split_indices(ROWS, (0.15, 0.15), seed)
        vocab = Vocabulary.build([texts[i] for i in tr.tolist()], min_frequency=3, max_size=20000)
        words = vocab.encode_batch(texts, LENGTH).float()
        num = (numbers - numbers[tr].mean(0)) / numbers[tr].std(0)
        x = torch.cat([words, num, department[:, None], torch.ones(ROWS, 1)], 1)
        mean, std = rating[tr].mean(), rating[tr].std()
        targets = {"sentiment": sentiment, "rating": (rating - mean) / std}
        dropped = x.clone()
        gone = torch.rand(ROWS, generator=torch.Generator().manual_seed(100 + seed)) < DROP
        dropped[gone, :LENGTH], dropped[gone, -1] = 0, 0
        no_text = x.clone()
        no_text[:, :LENGTH], no_text[:, -1] = 0, 0
        text_spec = {"name": "text", "columns": [0, LENGTH], "vocab_size": len(vocab), "kind": "bag", "embedding_dim": 64,
                     "out_features": 64, "present": LENGTH + 3}
        profile_spec = {"name": "tabular", "columns": [LENGTH, LENGTH + 3], "n_numeric": 2, "cardinalities": [6], "hidden": [32]}
        cells = {
            "text only (bag)": (lambda: Text(vocab_size=len(vocab), kind="bag", embedding_dim=64, out_features=64),  # noqa: B023
                                lambda t: t[:, :LENGTH].long(), x),
            "tabular only (age, feedback, department)": (lambda: Tabular(n_numeric=2, cardinalities=[6], hidden=[32]),
                                                         lambda t: t[:, LENGTH:LENGTH + 3], x),
            "fused concat": (lambda: Fused(modalities={"text": text_spec, "profile": profile_spec}, fusion="concat"),  # noqa: B023
                             lambda t: t, dropped),
            "fused gated": (lambda: Fused(modalities={"text": text_spec, "profile": profile_spec}, fusion="gated"),  # noqa: B023
                            lambda t: t, dropped),
        }
        for name, (make, view, train_x) in cells.items():
            torch.manual_seed(seed)
            model = pt.models.HardSharing(make(), TASKS, head_hidden=[32])
            trainer = pt.Trainer(model, TASKS, method="equal", loop={"epochs": EPOCHS, "batch_size": 64}, optim={"lr": 2e-3},
                                 run={"progress": False}, seed=seed)
            trainer.fit(pt.data.MultiOutputDataset(view(train_x[tr]), {k: v[tr] for k, v in targets.items()}),
                        pt.data.MultiOutputDataset(view(x[va]), {k: v[va] for k, v in targets.items()}))
            row = {"model": name, "seed": seed}
            for label, test_x in (("", x), ("no_text_", no_text)):
                if label and not name.startswith("fused"):
                    continue
                m = trainer.evaluate(pt.data.MultiOutputDataset(view(test_x[te]), {k: v[te] for k, v in targets.items()}))
                row[f"{label}sentiment_auroc"] = round(m["sentiment"]["auroc"], 4)
                row[f"{label}rating_rmse"] = round(m["rating"]["rmse"] * float(std), 4)
            rows.append(row)
            print(row, flush=True)
    fields = ["model", "seed", "sentiment_auroc", "rating_rmse", "no_text_sentiment_auroc", "no_text_rating_rmse"]
    with (OUT / "issue16_fusion.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Clothing reviews, {ROWS} rows, hard sharing, equal weights, {EPOCHS} epochs, batch 64, Adam 2e-3, seeds "
             f"{list(SEEDS)}; test split, mean ± std; rating RMSE in stars. Fused models trained with {DROP:.0%} of texts "
             "missing; 'no text' = every test text removed (presence flag 0).", "",
             "| model | sentiment AUROC | rating RMSE | sentiment AUROC, no text | rating RMSE, no text |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == name]

        def stat(key: str) -> str:
            values = [float(r[key]) for r in mine if key in r]  # noqa: B023
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}" if values else "—"

        lines.append(f"| {name} | {stat('sentiment_auroc')} | {stat('rating_rmse')} | {stat('no_text_sentiment_auroc')} | "
                     f"{stat('no_text_rating_rmse')} |")
    (OUT / "issue16_fusion.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
