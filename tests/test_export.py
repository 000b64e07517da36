"""Loading a trained run back in Python and exporting models (issue 20).

``polytask.runs.load`` on a run trained through the CLI config path and on one written by a
``polytask.Trainer`` in Python; ``export`` to ONNX (run with onnxruntime), TorchScript and
safetensors for every registered architecture, each with a tiny encoder. No mocks: the real
exporter, onnxruntime and safetensors.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import Tensor, nn

import polytask as pt
from polytask.cli import pipeline
from polytask.cli.main import main
from polytask.core.errors import ConfigError, DataError, InvalidParameterError, MissingDependencyError
from polytask.models import ARCHITECTURES
from polytask.models.base import MultiTaskModel
from polytask.models.encoders import CNN, MLP
from polytask.models.export import ExportError, load_weights, onnx_metadata, read_metadata, run_onnx
from polytask.runs import Run, export, load
from polytask.train.checkpoint import CheckpointError

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")]

TASKS = [pt.Task("reg", kind="regression"), pt.Task("bin", kind="binary"), pt.Task("cls", kind="multiclass", num_classes=3)]


# ------------------------------------------------------------------------------- tiny models
def tiny_model(name: str, tasks: Sequence[pt.Task] | None = None, seed: int = 0) -> tuple[MultiTaskModel, Tensor]:
    """Architecture ``name`` on a tiny encoder (MLP 6 → 8; MTAN: a two-block CNN on 8×8 images)
    and a batch of 5 inputs for it."""
    if tasks is None:
        tasks = ([pt.Task("click", kind="binary"), pt.Task("buy", kind="binary")] if name == "esmm" else TASKS)
    torch.manual_seed(seed)
    cls = ARCHITECTURES.get(name)
    if name == "mtan":
        return cls(CNN(in_channels=1, channels=[4, 8], out_features=8), tasks), torch.randn(5, 1, 8, 8)
    if "encoder_factory" in ARCHITECTURES.parameters(name):
        return cls(lambda: MLP(in_features=6, hidden=[8]), tasks), torch.randn(5, 6)
    return cls(MLP(in_features=6, hidden=[8]), tasks), torch.randn(5, 6)


def reference(model: MultiTaskModel, x: Tensor) -> dict[str, Tensor]:
    model.eval()
    with torch.no_grad():
        return {k: v.clone() for k, v in model(x).items()}


def example_for(name: str) -> Tensor | None:
    """What export traces with: the model's own placeholder, except MTAN's images (a CNN does not fix their size)."""
    return torch.zeros(2, 1, 8, 8) if name == "mtan" else None


# ------------------------------------------------------------------------------------- runs
def synthetic(n: int, seed: int) -> pt.data.MultiOutputDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return pt.data.MultiOutputDataset(x, {"reg": x[:, 0] - x[:, 1], "bin": (x[:, 2] > 0).float(),
                                          "cls": (x[:, 3] > 0).long() + (x[:, 4] > 0.5).long()})


def fresh_trainer_model() -> pt.models.HardSharing:
    torch.manual_seed(0)
    return pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[8]), TASKS)


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory) -> tuple[Path, MultiTaskModel]:
    """A 1-epoch run written by polytask.Trainer (sections API); the trained model (best weights)."""
    folder = tmp_path_factory.mktemp("trainer")
    model = fresh_trainer_model()
    trainer = pt.Trainer(model, TASKS, method="equal", loop={"epochs": 1, "batch_size": 32}, run={"progress": False},
                         output_dir=folder / "run")
    trainer.fit(synthetic(96, 0), synthetic(32, 1))
    return folder / "run", model


def table(n: int, seed: int) -> pd.DataFrame:
    """Two numeric features, one categorical; a regression, a yes/no binary and a three-colour target."""
    r = np.random.default_rng(seed)
    f1, f2 = r.normal(size=n), r.normal(size=n)
    cat = r.choice(["a", "b", "c"], size=n)
    return pd.DataFrame({"f1": f1, "f2": f2, "cat": cat, "y_reg": 2 * f1 - f2,
                         "y_bin": np.where(f1 + f2 > 0, "yes", "no"),
                         "y_cls": np.where(cat == "a", "red", np.where(f1 > 0, "green", "blue"))})


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """A 1-epoch run trained by `polytask train CONFIG` on CSV files with string labels."""
    folder = tmp_path_factory.mktemp("cli")
    table(160, 0).to_csv(folder / "train.csv", index=False)
    table(60, 1).to_csv(folder / "val.csv", index=False)
    cfg = {"seed": 0, "output_dir": str(folder / "run"),
           "data": {"files": {"train": str(folder / "train.csv"), "val": str(folder / "val.csv")}},
           "tasks": {"reg": {"kind": "regression", "target": "y_reg"}, "bin": {"kind": "binary", "target": "y_bin"},
                     "cls": {"kind": "multiclass", "target": "y_cls", "num_classes": 3}},
           "model": {"encoder": {"name": "mlp", "hidden": [8]}}, "method": {"name": "equal"},
           "train": {"epochs": 1, "batch_size": 64}, "optim": {"lr": 0.01}}
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(["train", str(folder / "cfg.yaml"), "--quiet"]) == 0, err.getvalue()
    return folder / "run"


# ----------------------------------------------------------------------------------- load
def test_load_cli_run_predicts_with_ids_and_label_names(cli_run):
    run = load(cli_run)
    assert isinstance(run, Run) and run.task_names == ["reg", "bin", "cls"] and run.config is not None
    assert run.labels == {"reg": None, "bin": ["no", "yes"], "cls": ["blue", "green", "red"]}
    assert not run.model.training
    rows = table(7, 5).drop(columns=["y_reg", "y_bin", "y_cls"])
    rows.index = range(100, 107)
    out = run.predict(rows)
    assert list(out.columns) == ["id", "reg", "bin", "bin_probability", "cls", "cls_probability"]
    assert out["id"].tolist() == list(range(100, 107))
    assert set(out["bin"]) <= {"no", "yes"} and set(out["cls"]) <= {"blue", "green", "red"}
    assert ((out["bin_probability"] >= 0.5) == (out["bin"] == "yes")).all()
    # the same columns and predictions as `polytask predict` (pipeline.predict) on the same rows
    path = cli_run.parent / "rows.csv"
    rows.to_csv(path, index=False)
    cli = pipeline.predict(cli_run, path, None)
    np.testing.assert_allclose(out["reg"], cli["reg"], rtol=1e-6)
    np.testing.assert_allclose(out["bin_probability"], cli["bin_probability"], rtol=1e-6)
    assert list(cli.columns) == list(out.columns) and cli["bin"].tolist() == out["bin"].tolist()
    assert out["cls"].tolist() == cli["cls"].tolist()
    # a file path, an id column of the user's, one task, every class's probability
    rows["customer"] = list("abcdefg")
    one = run.predict(rows, id_column="customer", task="cls", probabilities=True)
    assert list(one.columns) == ["customer", "cls", "cls_probability", "cls_probability_blue", "cls_probability_green",
                                 "cls_probability_red"]
    assert one["customer"].tolist() == list("abcdefg")
    np.testing.assert_allclose(one[["cls_probability_blue", "cls_probability_green", "cls_probability_red"]].sum(axis=1), 1,
                               rtol=1e-5)
    assert run.predict(path)["reg"].tolist() == out["reg"].tolist()


def test_load_cli_run_evaluates_and_loads_last(cli_run):
    run = load(cli_run, checkpoint="last")
    assert run.checkpoint == "last"
    metrics = run.evaluate("val")
    assert set(metrics) == {"reg", "bin", "cls"} and "accuracy" in metrics["cls"]
    with pytest.raises(InvalidParameterError, match="'best' or 'last'"):
        load(cli_run, checkpoint="final")


def test_load_errors_say_what_to_do(cli_run, trainer_run, tmp_path):
    run_dir, _ = trainer_run
    assert load(run_dir).task_names == ["reg", "bin", "cls"]  # rebuilt from the model.json the Trainer wrote
    bare = tmp_path / "bare"
    shutil.copytree(run_dir, bare)
    (bare / "model.json").unlink()
    with pytest.raises(ConfigError, match=r"neither config\.yaml nor model\.json.*model=model"):
        load(bare)
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nowhere")
    wrong = pt.models.HardSharing(pt.encoders.MLP(in_features=5, hidden=[8]), TASKS)
    with pytest.raises(CheckpointError, match="does not fit the model given"):
        load(run_dir, model=wrong)
    run = load(cli_run)
    rows = table(3, 2)
    with pytest.raises(DataError, match="id_column 'custmer' is not a column.*Did you mean"):
        run.predict(rows.assign(customer=1), id_column="custmer")
    with pytest.raises(DataError, match="lacks feature column"):
        run.predict(rows.drop(columns=["f1"]))
    with pytest.raises(DataError, match=r"shape \(N, 6\)"):
        run.predict(np.zeros((3, 4), dtype=np.float32))


def test_load_trainer_run_into_a_fresh_model(trainer_run):
    run_dir, trained = trainer_run
    run = load(run_dir, model=fresh_trainer_model())
    assert run.config is None and run.preprocessing == {} and run.labels == {"reg": None, "bin": None, "cls": None}
    x = synthetic(9, 3).x
    want = reference(trained, x)
    for name, value in run.outputs(x).items():
        assert torch.equal(value, want[name]), name
    from_array = run.predict(x.numpy())
    from_frame = run.predict(pd.DataFrame(x.numpy(), columns=[f"f{i}" for i in range(6)]).assign(key=range(9)),
                             id_column="key")
    assert from_array["id"].tolist() == list(range(9)) and from_frame["key"].tolist() == list(range(9))
    np.testing.assert_allclose(from_array["reg"], want["reg"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(from_frame["bin_probability"], torch.sigmoid(want["bin"]).numpy(), rtol=1e-6)
    assert from_array["bin"].isin([0, 1]).all() and from_array["cls"].tolist() == want["cls"].argmax(1).tolist()


@pytest.mark.skipif(not hasattr(pt, "load"), reason="polytask.load/export are not exported from polytask/__init__.py yet")
def test_top_level_names():
    assert pt.load is load and pt.export is export


# --------------------------------------------------------------------------------- ONNX
def assert_onnx_matches(path: Path, model: MultiTaskModel, x: Tensor, outputs: Sequence[str]) -> float:
    got = run_onnx(path, x)
    assert list(got) == list(outputs)
    want = reference(model, x)
    worst = max(float(np.abs(got[t] - want[t].numpy()).max()) for t in outputs)
    assert worst < 1e-5, worst
    return worst


def test_onnx_export_of_a_trainer_run(trainer_run, tmp_path):
    import onnxruntime as ort

    run_dir, trained = trainer_run
    run = load(run_dir, model=fresh_trainer_model())
    path = export(run, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "input" and isinstance(inp.shape[0], str) and inp.shape[1:] == [6]  # a free batch dimension
    assert [o.name for o in session.get_outputs()] == ["reg", "bin", "cls"]
    for n in (1, 7):
        assert_onnx_matches(path, trained, synthetic(n, 4).x, ["reg", "bin", "cls"])
    info = onnx_metadata(path)
    assert info["architecture"] == "hard_sharing" and info["outputs"] == ["reg", "bin", "cls"]
    assert [t["kind"] for t in info["tasks"]] == ["regression", "binary", "multiclass"]
    assert info["input"] == {"name": "input", "shape": [None, 6], "dtype": "float32"}


@pytest.mark.slow
def test_onnx_export_of_a_cli_run_carries_labels_and_preprocessing(cli_run, tmp_path):
    run = load(cli_run)
    path = export(cli_run, tmp_path / "cli.onnx")  # a run directory is loaded first
    rows = table(6, 7)
    x = run.encode(rows)
    assert_onnx_matches(path, run.model, x, ["reg", "bin", "cls"])
    info = onnx_metadata(path)
    assert info["labels"]["cls"] == ["blue", "green", "red"]
    assert info["preprocess"]["features"]["categorical"] == ["cat"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_onnx_every_architecture(name, tmp_path):
    model, x = tiny_model(name)
    path = export(model, tmp_path / f"{name}.onnx", example=example_for(name))
    assert_onnx_matches(path, model, x, list(model.task_names))


# --------------------------------------------------------------------------- TorchScript
@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_torchscript_every_architecture(name, tmp_path):
    model, x = tiny_model(name)
    path = export(model, tmp_path / f"{name}.pt", example=example_for(name))  # format from the suffix
    extra = {"polytask.json": ""}
    loaded = torch.jit.load(str(path), _extra_files=extra)
    assert json.loads(extra["polytask.json"])["architecture"] == name
    with torch.no_grad():
        got = loaded(x)
    want = reference(model, x)
    assert list(got) == list(model.task_names)
    for task, value in want.items():
        assert torch.allclose(got[task], value, atol=1e-6, rtol=0), (task, float((got[task] - value).abs().max()))


# --------------------------------------------------------------------------- safetensors
@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_safetensors_every_architecture_loads_into_a_fresh_model(name, tmp_path):
    model, x = tiny_model(name, seed=0)
    path = export(model, tmp_path / "weights.safetensors")  # weights need no example input, even MTAN's
    info = read_metadata(path)
    assert info["architecture"] == name and [t["name"] for t in info["tasks"]] == list(model.task_names)
    assert info.get("input") == (None if name == "mtan" else {"name": "input", "shape": [None, 6], "dtype": "float32"})
    fresh, _ = tiny_model(name, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    assert load_weights(fresh, path) == info
    want, got = reference(model, x), reference(fresh, x)
    for task in want:
        assert torch.equal(got[task], want[task]), task


def test_safetensors_refuses_other_tasks(tmp_path):
    model, _ = tiny_model("hard_sharing")
    path = export(model, tmp_path / "w.safetensors")
    other = pt.models.HardSharing(MLP(in_features=6, hidden=[8]), [pt.Task("price", kind="regression")])
    with pytest.raises(ExportError, match=r"tasks \['reg', 'bin', 'cls'\]"):
        load_weights(other, path)


# ----------------------------------------------------------------------- errors and options
class _BatchSized(MultiTaskModel):
    """Reads the batch size as a Python int (``len(x)``), which a trace bakes in as a constant."""

    def __init__(self) -> None:
        super().__init__([pt.Task("reg", kind="regression")])
        self.encoder = nn.Linear(6, 4)
        self.head = nn.Linear(4, 1)

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        return self.encoder(x) * len(x)

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        return {"reg": self.tasks["reg"].prepare_prediction(self.head(z))}


def test_an_unexportable_model_is_named_with_the_reason(tmp_path):
    model = _BatchSized()
    with pytest.raises(ExportError, match=r"torchscript export of architecture '_BatchSized' differs .* batch size as a Python int"):
        export(model, tmp_path / "m.pt", example=torch.randn(4, 6))
    with pytest.raises(ExportError, match=r"(?s)'_BatchSized' cannot be exported to onnx: .*specialized it to be a "
                                          r"constant \(4\).*no branch on the values"):
        export(model, tmp_path / "m.onnx", example=torch.randn(4, 6))
    export(model, tmp_path / "m.safetensors", example=torch.randn(4, 6))  # weights always save


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    model, _ = tiny_model("hard_sharing")
    for module in ("onnxscript", "safetensors.torch"):
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # what Python does for a package that is not installed
            suffix = ".onnx" if module == "onnxscript" else ".safetensors"
            with pytest.raises(MissingDependencyError, match=r"pip install 'polytask\[export\]'"):
                export(model, tmp_path / f"m{suffix}")


def test_format_and_inputs_are_checked(tmp_path):
    model, _ = tiny_model("hard_sharing")
    with pytest.raises(InvalidParameterError, match="one of onnx, torchscript, safetensors.*Did you mean 'onnx'"):
        export(model, tmp_path / "m.bin", format="onx")
    with pytest.raises(InvalidParameterError, match="at least 2 inputs"):
        export(model, tmp_path / "m.pt", example=torch.zeros(1, 6))
    cnn, _ = tiny_model("mtan")
    with pytest.raises(InvalidParameterError, match="expected example="):
        export(cnn, tmp_path / "m.pt")
    with pytest.raises(InvalidParameterError, match="loaded run, a run directory or a MultiTaskModel"):
        export(nn.Linear(2, 2), tmp_path / "m.pt")  # type: ignore[arg-type]


def test_per_task_inputs_export_one_task(tmp_path):
    torch.manual_seed(0)
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]
    model = pt.models.HardSharing(MLP(in_features=4, hidden=[8]), tasks, stems={"a": nn.Linear(3, 4), "b": nn.Linear(5, 4)})
    with pytest.raises(InvalidParameterError, match="task=NAME"):
        export(model, tmp_path / "m.pt")
    path = export(model, tmp_path / "b.pt", task="b")
    x = torch.randn(3, 5)
    got = torch.jit.load(str(path))(x)
    assert list(got) == ["b"]
    model.eval()
    with torch.no_grad():
        assert torch.allclose(got["b"], model(x, task="b")["b"])
