"""Runs trained from Python: model.json lets polytask.load, `polytask eval` and `polytask predict`
rebuild the model without a config (issue 20: "Python-API runs that polytask eval/predict accept")."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import polytask as pt
from polytask.cli.main import main
from polytask.core.errors import ConfigError
from polytask.core.task import standardize_targets
from polytask.models.spec import build_from_spec, model_spec, why_no_spec

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def frame(n: int, seed: int) -> pd.DataFrame:
    r = np.random.default_rng(seed)
    f = r.normal(size=(n, 3))
    return pd.DataFrame({"f0": f[:, 0], "f1": f[:, 1], "f2": f[:, 2], "price": 1000 * f[:, 0] + 5000,
                         "good": (f[:, 1] > 0).astype(int)})


def dataset(table: pd.DataFrame) -> pt.MultiOutputDataset:
    x = torch.tensor(table[["f0", "f1", "f2"]].to_numpy(), dtype=torch.float32)
    return pt.MultiOutputDataset(x, {"price": torch.tensor(table["price"].to_numpy(), dtype=torch.float32),
                                     "good": torch.tensor(table["good"].to_numpy(), dtype=torch.float32)})


@pytest.fixture(scope="module")
def python_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyrun")
    train, test = dataset(frame(300, 0)), dataset(frame(100, 1))
    tasks = standardize_targets([pt.Task("price", "regression"), pt.Task("good", "binary")], train, test)
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=3, hidden=[16]), tasks)
    trainer = pt.Trainer(model, tasks, loop={"epochs": 3, "batch_size": 32}, run={"progress": False},
                         output_dir=folder / "run")
    trainer.fit(train)
    return folder, trainer, test


def test_a_python_run_records_its_model_and_loads_without_it(python_run):
    folder, trainer, _ = python_run
    spec = json.loads((folder / "run" / "model.json").read_text())
    assert spec["model"]["name"] == "hard_sharing" and spec["model"]["arguments"]["encoder"]["name"] == "mlp"
    run = pt.load(folder / "run")  # no model= needed
    x = torch.randn(7, 3)
    expected = trainer.model.eval()(x)
    got = run.model(x)
    assert all(torch.equal(expected[t], got[t]) for t in ("price", "good"))
    assert run.tasks[0].target_scaling == trainer.tasks[0].target_scaling


def test_cli_predict_and_eval_accept_a_python_run(python_run, tmp_path):
    folder, trainer, test = python_run
    rows = frame(100, 1)
    rows.drop(columns=["price", "good"]).to_csv(tmp_path / "new.csv", index=False)
    code, out, err = cli("predict", folder / "run", "--input", tmp_path / "new.csv")
    assert code == 0, err
    pred = pd.read_csv(io.StringIO(out))
    assert list(pred.columns) == ["id", "price", "good", "good_probability"] and len(pred) == 100
    assert abs(pred["price"].mean() - 5000) < 500  # in dollars, not standardised units
    rows.to_csv(tmp_path / "labelled.csv", index=False)
    code, out, err = cli("eval", folder / "run", "--input", tmp_path / "labelled.csv")
    assert code == 0, err
    printed = {(line.split()[0], line.split()[1]): float(line.split()[2].replace(",", "")) for line in out.splitlines()[2:]}
    expected = trainer.evaluate(test)
    assert printed[("good", "accuracy")] == pytest.approx(expected["good"]["accuracy"], abs=1e-4)
    assert printed[("price", "rmse")] == pytest.approx(expected["price"]["rmse"], rel=1e-3)


def test_eval_of_a_python_run_without_input_says_what_to_pass(python_run):
    folder, _, _ = python_run
    code, _, err = cli("eval", folder / "run")
    assert code == 2 and err.startswith("error: ") and "--input FILE" in err, err


def test_eval_table_without_a_target_column_names_it(python_run, tmp_path):
    folder, _, _ = python_run
    frame(20, 2).drop(columns=["good"]).to_csv(tmp_path / "t.csv", index=False)
    code, _, err = cli("eval", folder / "run", "--input", tmp_path / "t.csv")
    assert code == 2 and "good" in err and "Traceback" not in err, err


class Own(nn.Module):
    out_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(3, 8)

    def forward(self, x):
        return self.net(x)


def test_a_model_with_a_users_own_part_has_no_recipe_and_load_says_so(tmp_path):
    tasks = [pt.Task("good", "binary")]
    model = pt.models.HardSharing(Own(), tasks)
    assert model_spec(model) is None and "Own" in why_no_spec(model)
    table = frame(40, 0)
    data = pt.MultiOutputDataset(torch.tensor(table[["f0", "f1", "f2"]].to_numpy(), dtype=torch.float32),
                                 {"good": torch.tensor(table["good"].to_numpy(), dtype=torch.float32)})
    pt.Trainer(model, tasks, loop={"epochs": 1}, run={"progress": False}, output_dir=tmp_path / "run").fit(data)
    assert not (tmp_path / "run" / "model.json").exists()
    with pytest.raises(ConfigError, match="neither config.yaml nor model.json"):
        pt.load(tmp_path / "run")
    assert pt.load(tmp_path / "run", model=pt.models.HardSharing(Own(), tasks)).task_names == ["good"]


@pytest.mark.parametrize("architecture", ["hard_sharing", "task_branches", "mtan"])
def test_recipes_rebuild_the_same_model(architecture):
    from polytask.models import ARCHITECTURES
    from polytask.models.encoders import ENCODERS

    tasks = [pt.Task("a", "regression", loss="huber"), pt.Task("b", "multiclass", num_classes=3, metrics=("accuracy",))]
    cls = ARCHITECTURES.get(architecture)
    torch.manual_seed(0)
    image = architecture == "mtan"  # MTAN attends over a CNN's blocks
    encoder = ENCODERS.create("cnn", channels=[4, 8], out_features=8) if image else ENCODERS.create(
        "mlp", in_features=4, hidden=[8, 8])
    model = cls(encoder=encoder, tasks=tasks)
    spec = model_spec(model)
    assert spec is not None, why_no_spec(model)
    rebuilt = build_from_spec(json.loads(json.dumps(spec)))
    rebuilt.load_state_dict(model.state_dict())
    x = torch.randn(5, 1, 12, 12) if image else torch.randn(5, 4)
    model.eval()
    rebuilt.eval()
    assert all(torch.equal(model(x)[t], rebuilt(x)[t]) for t in ("a", "b"))
    assert [t.loss.name for t in rebuilt.tasks.values()] == ["huber", "ce"]


def test_an_encoder_factory_has_no_recipe():
    """Architectures built from a factory (towers, columns, experts) keep a function: no recipe, said why."""
    tasks = [pt.Task("a", "regression"), pt.Task("b", "binary")]
    model = pt.models.CrossStitch(encoder_factory=lambda: pt.encoders.MLP(in_features=4, hidden=[8]), tasks=tasks)
    assert model_spec(model) is None and "function" in why_no_spec(model)


def test_a_zero_baseline_makes_delta_m_undefined_not_a_failed_run(tmp_path):
    """Before: the run trained to the end, then failed computing Δm (a division by a zero baseline)."""
    train = dataset(frame(60, 0))
    tasks = standardize_targets([pt.Task("price", "regression"), pt.Task("good", "binary")], train)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=3, hidden=[8]), tasks)
    baselines = {"price": {"rmse": 0.0}, "good": {"accuracy": 0.9}}
    trainer = pt.Trainer(model, tasks, loop={"epochs": 1}, run={"progress": False}, baselines=baselines,
                         output_dir=tmp_path / "run")
    with pytest.warns(UserWarning, match=r"Δm is undefined.*'rmse'.*\['price'\] is 0"):
        report = trainer.fit(train)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["delta_m"] is None and "undefined" in summary["delta_m_undefined"]
    assert report.summary["baselines"] == baselines
