"""Tokenizer and vocabulary, text and tabular encoders, categorical codes, reviews and MovieLens."""

import numpy as np
import pandas as pd
import pytest
import torch

import polytask as pt
from polytask.data.tabular import TabularPreprocessor
from polytask.data.text import Vocabulary, tokenize
from polytask.models.encoders import Tabular, Text


def test_tokenize_lowercases_and_splits_punctuation():
    assert tokenize("Love it!! Doesn't fit, size 4.") == ["love", "it", "!", "!", "doesn't", "fit", ",", "size", "4", "."]
    assert tokenize(None) == [] and tokenize(float("nan")) == []


def test_vocabulary_frequency_limits_and_state():
    texts = ["a a a b b c", "a b d", None]
    vocab = Vocabulary.build(texts, min_frequency=2, max_size=10)
    assert vocab.tokens == ["<pad>", "<unk>", "a", "b"]
    assert Vocabulary.build(texts, min_frequency=1, max_size=4).tokens == ["<pad>", "<unk>", "a", "b"]
    ids = vocab.encode_batch(["b a zzz", "a " * 10, ""], max_length=4)
    assert ids.tolist() == [[3, 2, 1, 0], [2, 2, 2, 2], [0, 0, 0, 0]]
    again = Vocabulary.from_dict(vocab.to_dict())
    assert again.tokens == vocab.tokens
    import json

    json.dumps(vocab.to_dict())
    with pytest.raises(pt.InvalidParameterError, match="min_frequency"):
        Vocabulary.build(texts, min_frequency=0)


@pytest.mark.parametrize("kind", ["bag", "gru", "lstm", "transformer"])
def test_text_encoder_shapes_and_padding_invariance(kind):
    enc = Text(vocab_size=30, embedding_dim=8, kind=kind, hidden=8, heads=2, out_features=6, max_length=12).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0], [9, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    out = enc(tokens)
    assert out.shape == (3, 6) and torch.isfinite(out).all()
    padded = torch.cat([tokens, torch.zeros(3, 4, dtype=torch.long)], dim=1)
    torch.testing.assert_close(enc(padded), out, atol=1e-5, rtol=1e-5)
    with pytest.raises(pt.ShapeError, match="token ids"):
        enc(torch.randn(3, 5))


def test_text_encoder_bad_kind_named():
    with pytest.raises(pt.InvalidParameterError, match="bag, gru, lstm, transformer"):
        Text(vocab_size=10, kind="cnn")


def test_tabular_encoder_embeds_codes():
    enc = Tabular(n_numeric=2, cardinalities=[3, 5], embedding_dim=4, hidden=[8])
    x = torch.tensor([[0.5, -1.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    assert enc(x).shape == (2, 8)
    assert enc.net[0].in_features == 2 + 4 + 4
    with pytest.raises(pt.ShapeError, match="2 numbers"):
        enc(torch.randn(2, 3))


def test_preprocessor_codes_encoding_round_trip():
    frame = pd.DataFrame({"n": [1.0, 2.0, 3.0], "c": ["x", "y", "x"], "d": ["p", "p", "q"]})
    prep = TabularPreprocessor.fit(frame, ["n", "c", "d"], encoding="codes")
    x = prep.transform(frame)
    assert x.shape == (3, 3) and prep.out_features == 3 and prep.cardinalities == [3, 3]
    assert x[:, 1].tolist() == [0.0, 1.0, 0.0]
    again = TabularPreprocessor.from_dict(prep.to_dict())
    new = pd.DataFrame({"n": [2.0], "c": ["unseen"], "d": ["q"]})
    assert again.transform(new)[0, 1:].tolist() == [2.0, 1.0]  # unseen → last code
    assert TabularPreprocessor.fit(frame, ["n", "c", "d"]).out_features == 1 + 3 + 3  # one-hot stays the default
    with pytest.raises(pt.DataError, match="onehot, codes"):
        TabularPreprocessor.fit(frame, ["n"], encoding="ordinal")


def test_reviews_loader_small():
    data = pt.datasets.load("reviews", max_rows=400, max_length=20)
    assert [t.name for t in data.tasks] == ["sentiment", "topic"]
    assert data.train.x.dtype == torch.long and data.train.x.shape[1] == 20
    assert len(data.train) + len(data.val) + len(data.test) == 400
    assert data.encoder["name"] == "text" and data.train.x.max() < data.encoder["vocab_size"]
    assert set(data.train.targets["topic"].unique().tolist()) <= set(range(6))
    data.train.validate(data.tasks)


def test_movielens_funnel_labels():
    data = pt.datasets.load("movielens", max_rows=3000)
    click, conversion = data.train.targets["click"], data.train.targets["conversion"]
    assert (conversion <= click).all()  # a conversion is always a click
    assert 0.3 < click.mean() < 0.7 and 0 < conversion.mean() < click.mean()
    enc = data.encoder
    assert enc["name"] == "tabular" and enc["cardinalities"][2] == 2  # gender
    assert data.train.x.shape[1] == enc["n_numeric"] + len(enc["cardinalities"])


def _run(tmp_path, cfg):
    import json

    import yaml

    from polytask.cli.main import main

    cfg = {**cfg, "output_dir": str(tmp_path / "run"), "method": {"name": "equal"}}
    cfg.setdefault("train", {}).update(epochs=1)
    cfg["run"] = {"progress": False}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return json.loads((tmp_path / "run" / "summary.json").read_text())


@pytest.mark.parametrize("kind", ["bag", "gru"])
def test_reviews_trains_from_yaml(tmp_path, kind):
    summary = _run(tmp_path, {"data": {"dataset": "reviews", "options": {"max_rows": 600, "max_length": 30}},
                              "model": {"architecture": "mmoe" if kind == "gru" else "hard_sharing",
                                        "encoder": {"name": "text", "kind": kind, "embedding_dim": 16,
                                                    "out_features": 16}},
                              "train": {"batch_size": 64}})
    assert set(summary["tasks"]) == {"sentiment", "topic"}


def test_movielens_esmm_trains_from_yaml(tmp_path):
    summary = _run(tmp_path, {"data": {"dataset": "movielens", "options": {"max_rows": 4000}},
                              "model": {"architecture": "esmm", "encoder": {"name": "tabular", "embedding_dim": 4,
                                                                            "hidden": [16]}},
                              "train": {"batch_size": 256}})
    assert set(summary["tasks"]) == {"click", "conversion"}


def test_adult_codes_with_tabular_encoder_trains_and_predicts(tmp_path):
    from polytask.cli.main import main
    from polytask.datasets.adult import ADULT_FILE

    _run(tmp_path, {"data": {"dataset": "adult", "options": {"encoding": "codes", "val_fraction": 0.9,
                                                             "test_fraction": 0.05}},
                    "model": {"architecture": "cgc", "encoder": {"name": "tabular", "hidden": [16]}},
                    "train": {"batch_size": 512}})
    rows = pd.read_parquet(ADULT_FILE.path()).head(5)
    rows.to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(tmp_path / "run"), "--input", str(tmp_path / "new.csv"),
                 "--output", str(tmp_path / "pred.csv")]) == 0
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert list(pred.columns) == ["id", "income", "income_probability", "marital", "marital_probability"] and len(pred) == 5
    probs = pred[["income_probability", "marital_probability"]].to_numpy()
    assert np.all((probs >= 0) & (probs <= 1)) and set(pred["income"]) <= {0, 1}


def test_tabular_encoder_on_one_hot_data_says_what_is_missing(tmp_path, capsys):
    import yaml

    from polytask.cli.main import main

    cfg = {"data": {"dataset": "adult"}, "output_dir": str(tmp_path / "run"),
           "model": {"architecture": "hard_sharing", "encoder": {"name": "tabular"}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "needs n_numeric, cardinalities" in err and "encoding: codes" in err
