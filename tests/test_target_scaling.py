"""Regression targets are standardised on the training rows (issue 20, item 1): raw dollar prices
train without tripping the gradient-health check, while metrics and predictions stay in dollars."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import polytask as pt
from polytask.cli.main import main
from polytask.core.task import standardize_targets
from polytask.data import MultiOutputDataset


def diamonds_like(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    carat, depth = rng.uniform(0.2, 3.0, n), rng.normal(61, 1.5, n)
    price = 4000.0 * carat ** 1.6 + 30.0 * (depth - 61) + rng.normal(0, 300, n)  # dollars, up to ~2e4
    return pd.DataFrame({"carat": carat, "depth": depth, "price": price, "cut": (depth > 61).astype(int)})


def config(tmp_path, **task_overrides) -> dict:
    diamonds_like(600, 0).to_csv(tmp_path / "train.csv", index=False)
    diamonds_like(200, 1).to_csv(tmp_path / "test.csv", index=False)
    price = {"kind": "regression", **task_overrides}
    return {"data": {"files": {"train": str(tmp_path / "train.csv"), "test": str(tmp_path / "test.csv")}},
            "tasks": {"price": price, "cut": {"kind": "binary"}}, "output_dir": str(tmp_path / "run"),
            "method": "equal", "train": {"epochs": 8, "batch_size": 32}, "optim": {"lr": 0.003},
            "run": {"progress": False}}


def run(tmp_path, cfg) -> int:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return main(["train", str(path), "--overwrite"])


def test_raw_dollar_targets_train_and_report_in_dollars(tmp_path, capsys):
    assert run(tmp_path, config(tmp_path)) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    price = summary["tasks"]["price"]
    assert price["r2"] > 0.9  # learns the price ...
    assert 100 < price["rmse"] < 3000  # ... and reports its error in dollars, not in standard deviations
    prep = json.loads((tmp_path / "run" / "preprocess.json").read_text())
    mean, std = prep["targets"]["price"]
    assert 1000 < std < 10000 and 1000 < mean < 20000  # fitted on the training rows, in dollars
    capsys.readouterr()
    new = diamonds_like(5, 7)
    new.drop(columns=["price", "cut"]).to_csv(tmp_path / "new.csv", index=False)
    assert main(["predict", str(tmp_path / "run"), "--input", str(tmp_path / "new.csv")]) == 0
    predicted = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))["price"].to_numpy()
    assert np.abs(predicted - new["price"].to_numpy()).mean() < 3000  # dollars
    assert main(["eval", str(tmp_path / "run")]) == 0  # the restored run unscales the same way
    row = next(ln.split() for ln in capsys.readouterr().out.splitlines() if ln.split()[:2] == ["price", "rmse"])
    assert float(row[2]) == pytest.approx(price["rmse"], rel=1e-3)


def test_without_standardisation_the_same_data_stops_at_the_explosion_check(tmp_path, capsys):
    assert run(tmp_path, config(tmp_path, standardize=False)) == 2
    assert "exceeds threshold" in capsys.readouterr().err


def test_standardize_targets_from_python():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 3, generator=g)
    train = MultiOutputDataset(x, {"y": 1000 + 50 * x[:, 0], "c": (x[:, 1] > 0).float()})
    val = MultiOutputDataset(x[:20], {"y": 1000 + 50 * x[:20, 0], "c": (x[:20, 1] > 0).float()})
    tasks = standardize_targets([pt.Task("y", kind="regression"), pt.Task("c", kind="binary")], train, val)
    mean, std = tasks[0].target_scaling
    assert tasks[1].target_scaling is None
    assert abs(float(train.targets["y"].mean())) < 1e-5 and float(train.targets["y"].std()) == pytest.approx(1, rel=1e-5)
    assert float(tasks[0].predict(torch.zeros(1))) == pytest.approx(mean)
    with pytest.raises(pt.InvalidParameterError, match="target_scaling"):
        pt.Task("c", kind="binary", target_scaling=(0.0, 1.0))
