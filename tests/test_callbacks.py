"""Callbacks from Python and from YAML: the built-ins, a user's class by import path, state in
checkpoints, and the errors."""

from __future__ import annotations

import textwrap

import pytest
import torch
import yaml

import polytask as pt
from polytask.cli.main import main
from polytask.data import MultiOutputDataset

TASKS = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]


def data(n: int = 96) -> MultiOutputDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return MultiOutputDataset(x, {"a": x[:, 0], "b": (x[:, 1] > 0).float()})


def test_user_callback_from_yaml_by_import_path_runs_and_keeps_its_state(tmp_path, monkeypatch):
    (tmp_path / "my_callbacks.py").write_text(textwrap.dedent('''
        import json
        from polytask.train import Callback

        class CountSteps(Callback):
            def __init__(self, out):
                self.out, self.steps = out, 0

            def on_step_end(self, trainer, step):
                self.steps += 1

            def on_fit_end(self, trainer, summary):
                open(self.out, "w").write(json.dumps({"steps": self.steps, "method": trainer.method_name}))

            def state_dict(self):
                return {"steps": self.steps}

            def load_state_dict(self, state):
                self.steps = state["steps"]
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "count.json"
    cfg = {"data": {"dataset": "adult", "options": {"rows": 600}}, "output_dir": str(tmp_path / "run"),
           "method": "equal", "train": {"epochs": 1, "batch_size": 100}, "run": {"progress": False},
           "callbacks": [{"name": "my_callbacks:CountSteps", "out": str(out)}, "console"]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    first = __import__("json").loads(out.read_text())
    assert first["method"] == "equal" and first["steps"] > 0
    assert main(["train", str(path), "--set", "train.epochs=2", "--resume"]) == 0
    second = __import__("json").loads(out.read_text())
    assert second["steps"] == 2 * first["steps"]  # the count resumed from the checkpoint


@pytest.mark.parametrize(("name", "message"), [
    ("nowhere_module:Thing", "module 'nowhere_module' cannot be imported"),
    ("polytask.train.trainer:Trainer", "is not a polytask.train.Callback subclass"),
    ("tensorbord", "Did you mean 'tensorboard'"),
])
def test_bad_callback_names_are_one_clear_error(tmp_path, capsys, name, message):
    cfg = {"data": {"dataset": "adult"}, "output_dir": str(tmp_path / "run"), "callbacks": [{"name": name}]}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_console_named_explicitly_is_not_a_duplicate_and_prints_one_line_per_epoch(capsys):
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[8]), TASKS)
    trainer = pt.Trainer(model, TASKS, loop={"epochs": 2, "batch_size": 32}, callbacks=[{"name": "console"}])
    trainer.fit(data(), data(48))
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("epoch ")]
    assert [ln.split()[1] for ln in lines] == ["1/2", "2/2"]
    assert "a rmse" in lines[0] and "b accuracy" in lines[0]


def test_two_callbacks_with_one_state_key_are_refused():
    class Mine(pt.train.Callback):
        pass

    model = pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[8]), TASKS)
    with pytest.raises(pt.InvalidParameterError, match="appear twice"):
        pt.Trainer(model, TASKS, callbacks=[Mine(), Mine()])
