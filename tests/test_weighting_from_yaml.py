"""Every loss-weighting method trains the Adult demo from YAML; weights of every epoch are logged and plotted."""

import json

import pandas as pd
import pytest

from polytask.cli.main import main
from polytask.methods import METHODS

LOSS_METHODS = [n for n in METHODS.names() if METHODS.get(n).needs == "losses" and n != "warmup"]
EXTRA = {"dwa": ["--set", "method.temperature=2"], "dtp": ["--set", "method.gamma=1.0"]}


@pytest.mark.parametrize("name", LOSS_METHODS + ["gradnorm", "db_mtl", "warmup"])
def test_method_trains_adult_from_yaml(tmp_path, name):
    sets = ["train.epochs=3", "train.batch_size=128", "data.options={rows: 3000}", f"output_dir={tmp_path / 'run'}",
            f"method.name={name}"]
    if name == "warmup":
        sets += ["method.inner=dwa", "method.steps=20"]
    args = ["train", "examples/adult.yaml", "--quiet"] + [a for s in sets for a in ("--set", s)] + EXTRA.get(name, [])
    assert main(args) == 0
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    weights = metrics[(metrics.split == "train") & (metrics.metric == "weight")]
    assert sorted(set(weights.epoch)) == [1, 2, 3] and set(weights.task) == {"income", "marital"}
    assert weights.value.notna().all() and (weights.value >= 0).all()
    steps = pd.read_csv(tmp_path / "run" / "steps.csv")
    assert len(steps) == 2 * steps.step.nunique()  # a weight per task per step
    assert (tmp_path / "run" / "training.png").stat().st_size > 5000
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["method"] == name
    assert summary["tasks"]["income"]["accuracy"] > 0.74
