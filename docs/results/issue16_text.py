"""Encoder `pretrained_text` (frozen all-MiniLM-L6-v2, cached embeddings) against the `text` encoders
(bag, GRU, Transformer) on a subset of the clothing reviews (issue 16).

Same rows, tasks, split, architecture (hard sharing), method (equal), optimiser and epochs for every
encoder; only the encoder and its tokenisation differ (polytask's word vocabulary built on the
training split for `text`, MiniLM's word pieces for `pretrained_text`). The subset is ``ROWS``
reviews drawn once (seed 0, as ``load_reviews(max_rows=ROWS)`` draws them); the seeds change the
split and the initialisation. Writes issue16_text.csv and issue16_text.md. Run from the root:

    nice -n 10 .venv/bin/python docs/results/issue16_text.py
"""

from __future__ import annotations

import csv
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pandas as pd  # noqa: E402
import torch  # noqa: E402

import polytask as pt  # noqa: E402
from polytask.data.text import Vocabulary  # noqa: E402
from polytask.datasets.base import split_indices  # noqa: E402
from polytask.datasets.reviews import AVAILABLE, DEPARTMENTS, REVIEWS_FILE  # noqa: E402
from polytask.models.encoders import PretrainedText, Text  # noqa: E402

OUT = Path(__file__).resolve().parent
ROWS = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
SEEDS = (0, 1, 2)
EPOCHS = 8
TASKS = [AVAILABLE["sentiment"], AVAILABLE["topic"], AVAILABLE["rating"]]
CACHE = Path(__file__).resolve().parents[2] / "runs" / "issue16_text" / "embedding_cache"


def reviews(rows: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    """The rows and targets load_reviews builds, on the same seeded subset."""
    frame = pd.read_parquet(REVIEWS_FILE.path(False))
    text = frame["Title"].fillna("").astype(str) + " . " + frame["Review Text"].fillna("").astype(str)
    keep = (frame["Review Text"].notna() | frame["Title"].notna()) & frame["Department Name"].isin(DEPARTMENTS)
    frame, text = frame[keep].reset_index(drop=True), text[keep].reset_index(drop=True)
    pick = torch.randperm(len(frame), generator=torch.Generator().manual_seed(0))[:rows].sort().values.numpy()
    frame, text = frame.iloc[pick].reset_index(drop=True), text.iloc[pick].reset_index(drop=True)
    rating = torch.tensor(frame["Rating"].to_numpy(), dtype=torch.float32)
    targets = {"sentiment": torch.tensor(frame["Recommended IND"].to_numpy(), dtype=torch.float32),
               "topic": torch.tensor(pd.Categorical(frame["Department Name"], categories=DEPARTMENTS).codes, dtype=torch.long),
               "rating": rating}
    return text.tolist(), targets


def run(encoder: torch.nn.Module, x: torch.Tensor, targets: dict[str, torch.Tensor], split, seed: int) -> dict[str, float]:
    train_idx, val_idx, test_idx = split
    mean, std = targets["rating"][train_idx].mean(), targets["rating"][train_idx].std()
    scaled = {**targets, "rating": (targets["rating"] - mean) / std}
    data = pt.data.MultiOutputDataset(x, scaled)
    model = pt.models.HardSharing(encoder, TASKS, head_hidden=[32])
    trainer = pt.Trainer(model, TASKS, method="equal", loop={"epochs": EPOCHS, "batch_size": 64}, optim={"lr": 2e-3},
                         run={"progress": False}, seed=seed)
    start = time.perf_counter()
    trainer.fit(data.subset(train_idx), data.subset(val_idx))
    seconds = time.perf_counter() - start
    m = trainer.evaluate(data.subset(test_idx))
    return {"sentiment_auroc": m["sentiment"]["auroc"], "topic_accuracy": m["topic"]["accuracy"],
            "rating_rmse": m["rating"]["rmse"] * float(std), "train_seconds": seconds}


def main() -> None:
    torch.set_num_threads(1)
    texts, targets = reviews(ROWS)
    pretrained = PretrainedText(cache_dir=str(CACHE), max_length=128)
    word_pieces = pretrained.tokenize(texts)
    start = time.perf_counter()
    pretrained.precompute(word_pieces)
    embed_seconds = time.perf_counter() - start
    print(f"embedded {ROWS} texts in {embed_seconds:.1f} s (0 when cached)", flush=True)
    rows = []
    for seed in SEEDS:
        split = split_indices(ROWS, (0.15, 0.15), seed)
        vocab = Vocabulary.build([texts[i] for i in split[0].tolist()], min_frequency=3, max_size=20000)
        words = vocab.encode_batch(texts, 100)
        encoders = {
            "text bag": lambda: Text(vocab_size=len(vocab), kind="bag", embedding_dim=64, out_features=64),  # noqa: B023
            "text gru": lambda: Text(vocab_size=len(vocab), kind="gru", embedding_dim=64, hidden=64, out_features=64),  # noqa: B023
            "text transformer": lambda: Text(vocab_size=len(vocab), kind="transformer", embedding_dim=64, hidden=128,  # noqa: B023
                                             layers=2, heads=4, max_length=100, out_features=64),
            "pretrained_text frozen": lambda: PretrainedText(cache_dir=str(CACHE), max_length=128, out_features=64),
        }
        for name, make in encoders.items():
            torch.manual_seed(seed)
            x = word_pieces if name.startswith("pretrained") else words
            row = {"encoder": name, "seed": seed, **run(make(), x, targets, split, seed)}
            rows.append(row)
            print(row, flush=True)
    with (OUT / "issue16_text.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"Clothing reviews, a fixed subset of {ROWS} rows (70/15/15 split per seed), hard sharing, equal weights, {EPOCHS} "
             f"epochs, batch 64, Adam 2e-3, seeds {list(SEEDS)}; test split, mean ± std. Rating RMSE in stars. "
             f"MiniLM embedded the {ROWS} texts once in {embed_seconds:.0f} s (1 thread, loaded machine; 0 when already cached); "
             "train seconds exclude that.", "",
             "| encoder | sentiment AUROC | topic accuracy | rating RMSE | train s |", "|---|---|---|---|---|"]
    for name in dict.fromkeys(r["encoder"] for r in rows):
        mine = [r for r in rows if r["encoder"] == name]

        def stat(key: str) -> str:
            values = [float(r[key]) for r in mine]  # noqa: B023
            return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

        lines.append(f"| {name} | {stat('sentiment_auroc')} | {stat('topic_accuracy')} | {stat('rating_rmse')} | "
                     f"{statistics.mean(float(r['train_seconds']) for r in mine):.0f} |")
    (OUT / "issue16_text.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def finetune(epochs: int = 2, lr: float = 2e-5, seed: int = 0) -> None:
    """One seed of mode: finetune on the same subset and split (the transformer at ``lr``, the rest at 2e-3)."""
    torch.set_num_threads(2)
    texts, targets = reviews(ROWS)
    split = split_indices(ROWS, (0.15, 0.15), seed)
    torch.manual_seed(seed)
    encoder = PretrainedText(mode="finetune", lr=lr, max_length=128, out_features=64)
    global EPOCHS
    EPOCHS = epochs
    row = {"encoder": f"pretrained_text finetune (lr {lr:g}, {epochs} epochs)", "seed": seed,
           **run(encoder, encoder.tokenize(texts), targets, split, seed)}
    print(row, flush=True)
    with (OUT / "issue16_text_finetune.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)


if __name__ == "__main__":
    finetune() if sys.argv[2:] == ["finetune"] else main()
