"""CAML-style explainable recommendation on the clothing reviews (issue 16): multi-task vs single-task.

Data: ``load("clothing_explain", max_rows=6000, seed=s)`` (reviewer profile + up to 8 other
training reviews of the item + 10 concept words → rating, recommended, title), seeds 0, 1, 2 (the
seed draws the split, the subset and the histories). Models: the ``caml`` architecture with the
``co_attention`` encoder (64-d), heads [64], a GRU generator (128 hidden, 64-d embeddings), Adam
2e-3, batch 64, 5 epochs, equal weights; the best epoch by a validation metric (ROUGE-L when the
model generates, else the task's RMSE or AUROC: the generation task's validation loss is the
free-running cross-entropy, which rises while the texts improve). Rows:

- caml multi-task, concept term λ_c = 0.05 and λ_c = 0;
- single-task caml: rating only, recommended only, explanation only (same encoder and heads);
- retrieval: the title of the item's history review closest (TF-IDF cosine, over its title and
  text ids) to the centroid of that row's history: the item's most typical existing title;
- constant: the training mean rating, and the most frequent training title for every row.

Explanations are scored on the test split with greedy decoding (the metric tracker) and with beam
search (beam 4, length penalty 1). Writes issue16_caml.csv (one row per run) and issue16_caml.md
(mean ± std). Run from the repository root:

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python docs/results/issue16_caml.py
"""

from __future__ import annotations

import csv
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import TfidfVectorizer

import polytask as pt
from polytask.core.task import EOS_ID, standardize_targets
from polytask.datasets import load
from polytask.models.caml import CAML
from polytask.models.encoders.co_attention import CoAttention
from polytask.text.metrics import as_text, corpus_bleu, mean_rouge

OUT = Path(__file__).resolve().parent
SEEDS = (0, 1, 2)
ROWS, EPOCHS, BEAM = 6000, 5, 4
CELLS = {  # label → (tasks, concept weight, the validation metric that picks the best epoch)
    "caml multi-task (λ_c = 0.05)": (("rating", "recommended", "explanation"), 0.05, "explanation/rouge_l"),
    "caml multi-task (λ_c = 0)": (("rating", "recommended", "explanation"), 0.0, "explanation/rouge_l"),
    "rating only": (("rating",), 0.0, "rating/rmse"),
    "recommended only": (("recommended",), 0.0, "recommended/auroc"),
    "explanation only": (("explanation",), 0.0, "explanation/rouge_l"),
}


def text_scores(predicted: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    hyp = [as_text(r) for r in predicted.tolist()]
    ref = [as_text(r) for r in target.tolist()]
    return {"bleu": corpus_bleu(hyp, ref), "rouge_1": mean_rouge(hyp, ref, "rouge1"),
            "rouge_2": mean_rouge(hyp, ref, "rouge2"), "rouge_l": mean_rouge(hyp, ref, "rougeL")}


def restrict(ds, names):
    return pt.data.dataset.MultiOutputDataset(ds.x, {n: ds.targets[n] for n in names})


def train_cell(data, tasks_all, label: str, names, concept_weight: float, monitor: str, seed: int) -> dict[str, object]:
    torch.manual_seed(seed)
    tasks = [t for t in tasks_all if t.name in names]
    spec = {k: v for k, v in data.encoder.items() if not k.startswith("_") and k != "name"}
    model = CAML(CoAttention(**spec), tasks, concept_weight=concept_weight, head_hidden=[64])
    trainer = pt.Trainer(model, tasks, method="equal", loop={"epochs": EPOCHS, "batch_size": 64, "monitor": monitor}, optim={"lr": 2e-3},
                         run={"progress": False}, seed=seed)
    start = time.perf_counter()
    trainer.fit(restrict(data.train, names), restrict(data.val, names))
    seconds = time.perf_counter() - start
    test = trainer.evaluate(restrict(data.test, names))
    row: dict[str, object] = {"model": label, "seed": seed, "train_seconds": round(seconds, 1),
                              "parameters": sum(p.numel() for p in model.parameters())}
    if "rating" in names:
        row["rating_rmse"] = round(test["rating"]["rmse"], 4)
    if "recommended" in names:
        row["recommended_auroc"] = round(test["recommended"]["auroc"], 4)
    if "explanation" in names:
        for k in ("bleu", "rouge_1", "rouge_2", "rouge_l"):
            row[f"greedy_{k}"] = round(test["explanation"][k], 4)
        greedy = model.generate(data.test.x)
        row["greedy_distinct"] = len({tuple(r) for r in greedy.tolist()})
        beam = model.generate(data.test.x, beam_size=BEAM, length_penalty=1.0)
        row["beam_distinct"] = len({tuple(r) for r in beam.tolist()})
        for k, v in text_scores(beam, data.test.targets["explanation"]).items():
            row[f"beam_{k}"] = round(v, 4)
    return row


def retrieval(data, seed: int) -> list[dict[str, object]]:
    """The most central history review's title, and the constant baselines."""
    layout = CoAttention(**{k: v for k, v in data.encoder.items() if not k.startswith("_") and k != "name"}).layout
    start, end = layout.parts["item reviews"]

    def reviews_of(x: torch.Tensor) -> np.ndarray:
        return x[:, start:end].reshape(len(x), layout.reviews, layout.review_length).numpy()

    words = lambda ids: [str(i) for i in ids if i != 0]  # noqa: E731  (the tokens of one review row)
    corpus = {tuple(r) for row in reviews_of(data.train.x) for r in row if r.any()}
    tfidf = TfidfVectorizer(analyzer=words).fit([list(r) for r in corpus])
    target = data.test.targets["explanation"]
    picked = torch.zeros_like(target)
    for i, row in enumerate(reviews_of(data.test.x)):
        real = [r for r in row if r.any()]
        vectors = tfidf.transform([list(r) for r in real])
        centroid = np.asarray(vectors.mean(axis=0))
        best = real[int(np.argmax(vectors @ centroid.ravel()))].tolist()
        title = best[:best.index(EOS_ID)] if EOS_ID in best else best
        title = (title or [1])[:target.shape[1] - 1] + [EOS_ID]
        picked[i, :len(title)] = torch.tensor(title)
    rows = [{"model": "retrieval (most central history title)", "seed": seed,
             "greedy_distinct": len({tuple(r) for r in picked.tolist()}),
             **{f"greedy_{k}": round(v, 4) for k, v in text_scores(picked, target).items()}}]
    common = Counter(tuple(r) for r in data.train.targets["explanation"].tolist()).most_common(1)[0][0]
    constant = torch.tensor([list(common)] * len(target))
    mean = float(data.train.targets["rating"].mean())
    rmse = float(((data.test.targets["rating"] - mean) ** 2).mean().sqrt())
    rows.append({"model": "constant (training mean rating, most frequent title)", "seed": seed, "rating_rmse": round(rmse, 4),
                 **{f"greedy_{k}": round(v, 4) for k, v in text_scores(constant, target).items()}})
    return rows


def main() -> None:
    torch.set_num_threads(1)
    rows: list[dict[str, object]] = []
    only = set(sys.argv[1:])
    for seed in SEEDS:
        data = load("clothing_explain", max_rows=ROWS, seed=seed)
        rows += retrieval(data, seed)
        print(rows[-2], rows[-1], flush=True)
        tasks = standardize_targets(data.tasks, data.train, data.val, data.test)
        for label, (names, weight, monitor) in CELLS.items():
            if only and label not in only:
                continue
            rows.append(train_cell(data, tasks, label, names, weight, monitor, seed))
            print(rows[-1], flush=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (OUT / "issue16_caml.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    labels = list(dict.fromkeys(r["model"] for r in rows))
    columns = [("rating_rmse", "rating RMSE (stars)"), ("recommended_auroc", "recommended AUROC"),
               ("greedy_bleu", "BLEU greedy"), ("greedy_rouge_1", "ROUGE-1 greedy"), ("greedy_rouge_l", "ROUGE-L greedy"),
               ("beam_bleu", f"BLEU beam {BEAM}"), ("beam_rouge_1", f"ROUGE-1 beam {BEAM}"), ("beam_rouge_l", f"ROUGE-L beam {BEAM}"),
               ("greedy_distinct", "distinct texts greedy"), ("beam_distinct", f"distinct texts beam {BEAM}"),
               ("train_seconds", "train s")]
    lines = ["| model | " + " | ".join(c for _, c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in labels:
        cells = []
        for key, _ in columns:
            values = [float(r[key]) for r in rows if r["model"] == label and key in r]
            if not values:
                cells.append("—")
            elif key in ("train_seconds", "greedy_distinct", "beam_distinct"):
                cells.append(f"{statistics.mean(values):.0f}")
            else:
                digits = 2 if "bleu" in key else 4
                cells.append(f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values) if len(values) > 1 else 0:.{digits}f}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    (OUT / "issue16_caml.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
