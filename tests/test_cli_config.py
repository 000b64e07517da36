"""The YAML config and the `polytask` command line, run in-process.

Config errors, data errors from CSV files, run-directory safety (nothing written is ever
corrupted), and the train / eval / predict / list commands on the bundled data sets.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import polytask as pt
from polytask.cli.main import main
from polytask.config import load_config
from polytask.datasets.adult import ADULT_FILE, FEATURES
from polytask.datasets.base import split_indices
from polytask.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
ADULT_YAML = ROOT / "examples" / "adult.yaml"
MULTIMNIST_YAML = ROOT / "examples" / "multimnist.yaml"
FAST = ["--quiet", "--set", "train.epochs=1", "--set", "train.batch_size=1024"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv: str) -> tuple[int, str, str]:
    """``polytask ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_clean_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (code, out, err)
    assert err.startswith("error: "), err
    assert "Traceback" not in err and "Traceback" not in out
    for needle in needles:
        assert needle in err, (needle, err)


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# --------------------------------------------------------------------------- CSV test data
def table(n: int, seed: int) -> pd.DataFrame:
    """Two numeric features and one categorical; a regression, a binary and a string-labelled
    three-class target, each learnable from the features."""
    r = np.random.default_rng(seed)
    f1, f2 = r.normal(size=n), r.normal(size=n)
    cat = r.choice(["a", "b", "c"], size=n)
    return pd.DataFrame({
        "f1": f1, "f2": f2, "cat": cat,
        "y_reg": 2 * f1 - f2 + 0.1 * r.normal(size=n),
        "y_bin": (f1 + f2 > 0).astype(int),
        "y_cls": np.where(cat == "a", "red", np.where(f1 > 0, "green", "blue")),
    })


def files_config(folder: Path, train: pd.DataFrame | None = None, val: pd.DataFrame | None = None,
                 **task_overrides: dict) -> Path:
    """Write train.csv, val.csv and cfg.yaml (absolute paths) into ``folder``; return the config path."""
    folder.mkdir(parents=True, exist_ok=True)
    (table(300, 0) if train is None else train).to_csv(folder / "train.csv", index=False)
    (table(120, 1) if val is None else val).to_csv(folder / "val.csv", index=False)
    tasks = {"reg": {"kind": "regression", "target": "y_reg"},
             "bin": {"kind": "binary", "target": "y_bin"},
             "cls": {"kind": "multiclass", "target": "y_cls", "num_classes": 3}}
    for name, override in task_overrides.items():
        tasks[name] = {**tasks.get(name, {}), **override}
    cfg = {"seed": 0, "output_dir": str(folder / "run"),
           "data": {"files": {"train": str(folder / "train.csv"), "val": str(folder / "val.csv")}},
           "tasks": tasks, "model": {"encoder": {"name": "mlp", "hidden": [32]}}, "method": {"name": "equal"},
           "train": {"epochs": 3, "batch_size": 32}, "optim": {"lr": 0.01}}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def files_run(tmp_path_factory):
    """A finished 3-epoch run from CSV files (reused, read-only: tests copy it before touching it)."""
    folder = tmp_path_factory.mktemp("files")
    cfg = files_config(folder)
    code, out, err = run_cli("train", cfg, "--quiet")
    assert code == 0, err
    return folder


@pytest.fixture
def files_copy(files_run, tmp_path):
    """A private copy of ``files_run`` whose config points at the copy."""
    folder = tmp_path / "copy"
    shutil.copytree(files_run, folder)
    cfg = yaml.safe_load((folder / "cfg.yaml").read_text())
    cfg["output_dir"] = str(folder / "run")
    cfg["data"]["files"] = {"train": str(folder / "train.csv"), "val": str(folder / "val.csv")}
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


@pytest.fixture(scope="module")
def adult_run(tmp_path_factory):
    """`polytask train examples/adult.yaml --baselines` for one epoch: (run folder, stdout)."""
    folder = tmp_path_factory.mktemp("adult") / "run"
    code, out, err = run_cli("train", ADULT_YAML, "--baselines", *FAST, "--set", f"output_dir={folder}")
    assert code == 0, err
    return folder, out


# ------------------------------------------------------------------------------ config errors
CONFIG_ERRORS = [
    (["train.epoch=3"], ["unknown key 'train.epoch'", "Did you mean 'epochs'?"]),
    (["model.head.hiden=[8]"], ["unknown key 'model.head.hiden'", "Did you mean 'hidden'?"]),
    (["model.encoder={name: mlp, hiden: [8]}"], ["encoder 'mlp' has no parameter 'hiden'", "Did you mean 'hidden'?"]),
    (["model.encoder.name=mpl"], ["unknown encoder 'mpl'", "Did you mean 'mlp'?"]),
    (["method.name=pcgard"], ["unknown method 'pcgard'", "Did you mean 'pcgrad'?", "Valid methods:", "nash_mtl"]),
    (["method={name: dwa, temprature: 1}"], ["method 'dwa' has no parameter 'temprature'", "Did you mean 'temperature'?"]),
    (["method={name: cagrad, c: -1}"], ["`c`", "CAGrad", ">= 0", "-1"]),
    (["method={name: static, weights: {incme: 2.0}}"], ["unknown task 'incme'", "Did you mean 'income'?"]),
    (["tasks.income.kind=binery"], ["tasks.income.kind", "'binary'", "found 'binery'"]),
    (["tasks.income.kind=regression"], ["tasks.income.kind", "binary", "regression"]),
    (["optim.lr=-0.1"], ["optim.lr", "greater than 0", "-0.1"]),
    (["train.lr=0.1"], ["train", "`lr` has moved: use `optim.lr`"]),
    (["engine.mode=features"], ["engine", "`mode` has moved: use `compare`"]),
    (["train.engine={scope: last_shared}"], ["train", "`engine` has moved"]),
    (["tasks.marital.lr=-1"], ["tasks.marital.lr", "greater than 0"]),
    (["data.dataset=adlt"], ["unknown dataset 'adlt'", "Did you mean 'adult'?"]),
    (["sampler.name=temprature"], ["unknown sampler 'temprature'", "Did you mean 'temperature'?"]),
    (["optim.optimizer=adma"], ["optim.optimizer", "'adam'", "found 'adma'"]),
    (["train.batch_size=true"], ["train.batch_size", "integer", "True"]),
    (["train.epochs=\"3\""], ["train.epochs", "integer", "'3'"]),
    (["tasks.incom={kind: binary}"], ["no task 'incom'", "Did you mean 'income'?"]),
    (["train.monitor=income/acuracy"], ["no metric 'acuracy'", "Did you mean 'accuracy'?"]),
    (["train.epochs"], ["--set expects key=value"]),
    (["train.epochs.max=3"], ["'epochs' is not a section"]),
]


@pytest.mark.parametrize(("overrides", "needles"), CONFIG_ERRORS, ids=[o[0] for o, _ in CONFIG_ERRORS])
def test_config_error_is_one_clear_message(tmp_path, overrides, needles):
    out_dir = tmp_path / "run"
    sets = [arg for o in overrides for arg in ("--set", o)]
    code, out, err = run_cli("train", ADULT_YAML, "--quiet", "--set", f"output_dir={out_dir}", *sets)
    assert_clean_error(code, out, err, *needles)
    assert err.count("\n") <= 3, err  # one message, not a dump
    assert not out_dir.exists(), "a run that fails validation writes nothing"


def test_missing_config_file_and_bad_yaml(tmp_path):
    assert_clean_error(*run_cli("train", tmp_path / "nope.yaml"), "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: adult\n")
    assert_clean_error(*run_cli("train", bad), "not valid YAML")
    bad.write_text("- a\n- b\n")
    assert_clean_error(*run_cli("train", bad), "mapping")


# -------------------------------------------------------------------------------- --set values
def test_set_nested_keys_and_yaml_values():
    cfg = load_config(ADULT_YAML, [
        "optim.lr=1.0e-2", "train.patience=3", "engine.every=4", "run.progress=false",
        "model.encoder={name: mlp, hidden: [16, 8]}", "model.head.hidden=[12]",
        "method={name: static, weights: {income: 2.0, marital: 0.5}}",
        "tasks.marital.weight=0.25", "data.options.task_sizes={income: 300, marital: 100}",
        "output_dir=/tmp/somewhere=else",
    ])
    assert cfg.optim.lr == 0.01 and cfg.train.patience == 3 and cfg.engine.every == 4
    assert cfg.run.progress is False and cfg.train.epochs == 6  # untouched keys keep the file's value
    assert cfg.model.encoder is not None and cfg.model.encoder.params == {"hidden": [16, 8]}
    assert cfg.model.head.hidden == [12]
    assert cfg.method.name == "static" and cfg.method.params == {"weights": {"income": 2.0, "marital": 0.5}}
    assert cfg.tasks is not None and cfg.tasks["marital"].weight == 0.25 and cfg.tasks["income"].kind == "binary"
    assert cfg.data.options == {"task_sizes": {"income": 300, "marital": 100}}
    assert str(cfg.output_dir) == "/tmp/somewhere=else"
    # null resets an optional key; a later --set wins over an earlier one
    assert load_config(ADULT_YAML, ["train.patience=3", "train.patience=null"]).train.patience is None
    assert load_config(ADULT_YAML, ["train.epochs=2", "train.epochs=5"]).train.epochs == 5


def test_set_values_reach_the_resolved_config(tmp_path):
    cfg = files_config(tmp_path)
    code, out, err = run_cli("train", cfg, "--quiet", "--set", "train.epochs=1",
                             "--set", "model.encoder={name: mlp, hidden: [8, 4]}",
                             "--set", "method={name: static, weights: {bin: 3.0}}",
                             "--set", "tasks.reg.weight=0.5")
    assert code == 0, err
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["model"]["encoder"]["hidden"] == [8, 4]
    assert resolved["method"] == {"name": "static", "weights": {"bin": 3.0}}
    assert resolved["tasks"]["reg"]["weight"] == 0.5 and resolved["train"]["epochs"] == 1
    with open(tmp_path / "run" / "steps.csv", newline="") as handle:
        weights = {(r["task"], float(r["weight"])) for r in csv.DictReader(handle)}
    assert weights == {("reg", 0.5), ("bin", 3.0), ("cls", 1.0)}


# ------------------------------------------------------------------------ data from CSV files
def test_files_run_trains_and_writes_the_contract(files_run):
    run = files_run / "run"
    assert {"config.yaml", "metrics.csv", "steps.csv", "summary.json", "training.png", "preprocess.json"} <= {
        p.name for p in run.iterdir()}
    summary = json.loads((run / "summary.json").read_text())
    assert summary["tasks"]["reg"]["r2"] > 0.8
    assert summary["tasks"]["bin"]["accuracy"] > 0.85
    assert summary["tasks"]["cls"]["accuracy"] > 0.8  # string labels: chance is about 1/3
    assert json.loads((run / "preprocess.json").read_text())["labels"]["cls"] == ["blue", "green", "red"]
    rows = read_metrics(run / "metrics.csv")
    assert list(rows[0]) == ["epoch", "split", "task", "metric", "value"]
    assert {(r["split"], r["task"]) for r in rows} == {(s, t) for s in ("train", "val") for t in ("reg", "bin", "cls")}
    for name in ("best.pt", "last.pt"):
        state = torch.load(run / "checkpoints" / name, weights_only=True)
        assert "model" in state


def test_target_column_missing_from_validation_file_names_task_and_column(tmp_path):
    cfg = files_config(tmp_path, val=table(120, 1).rename(columns={"y_bin": "y_bn"}))
    assert_clean_error(*run_cli("train", cfg, "--quiet"), "target column 'y_bin'", "task 'bin'", "Did you mean 'y_bn'?")
    assert not (tmp_path / "run").exists()


def test_missing_target_column_names_task_and_column(tmp_path):
    cfg = files_config(tmp_path, bin={"target": "y_binn"})
    assert_clean_error(*run_cli("train", cfg, "--quiet"), "target column 'y_binn'", "task 'bin'", "Did you mean 'y_bin'?")


def test_binary_label_out_of_range_names_task(tmp_path):
    train = table(300, 0)
    train.loc[7, "y_bin"] = 2
    cfg = files_config(tmp_path, train=train)
    assert_clean_error(*run_cli("train", cfg, "--quiet"), "task 'bin'", "[0, 1]", "label 2")
    assert not (tmp_path / "run").exists()


def test_binary_with_three_string_labels_names_task(tmp_path):
    train = table(300, 0)
    train["y_bin"] = np.where(train["y_bin"] == 1, "yes", "no")
    train.loc[3, "y_bin"] = "maybe"
    cfg = files_config(tmp_path, train=train)
    assert_clean_error(*run_cli("train", cfg, "--quiet"), "binary task 'bin'", "3 distinct labels")


def test_nan_target_without_allow_missing_names_task_and_row(tmp_path):
    train = table(300, 0)
    train.loc[5, "y_reg"] = np.nan
    cfg = files_config(tmp_path, train=train)
    assert_clean_error(*run_cli("train", cfg, "--quiet"), "'y_reg'", "task 'reg'", "line 7 (header = line 1)", "allow_missing")


def test_multiclass_label_out_of_range_names_task(tmp_path):
    train = table(300, 0)
    train["y_cls"] = train["y_cls"].map({"red": 0, "green": 1, "blue": 2})
    train.loc[11, "y_cls"] = 3
    val = table(120, 1)
    val["y_cls"] = val["y_cls"].map({"red": 0, "green": 1, "blue": 2})
    cfg = files_config(tmp_path, train=train, val=val)
    assert_clean_error(*run_cli("train", cfg, "--quiet"), "task 'cls'", "[0, 2]", "label 3")


def test_unseen_string_label_in_validation_names_task(tmp_path):
    val = table(120, 1)
    val.loc[4, "y_cls"] = "purple"
    cfg = files_config(tmp_path, val=val)
    assert_clean_error(*run_cli("train", cfg, "--quiet"), "task 'cls'", "'purple'")


def test_allow_missing_masks_nan_targets_and_trains(tmp_path):
    train, val = table(300, 0), table(120, 1)
    train.loc[train.index % 3 == 0, "y_bin"] = np.nan  # a third of the binary labels unknown
    train.loc[train.index % 4 == 1, "y_cls"] = np.nan
    val.loc[val.index % 5 == 0, "y_bin"] = np.nan
    cfg = files_config(tmp_path, train=train, val=val, bin={"allow_missing": True}, cls={"allow_missing": True})
    code, out, err = run_cli("train", cfg, "--quiet")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["tasks"]["bin"]["accuracy"] > 0.85
    assert summary["tasks"]["cls"]["accuracy"] > 0.7
    for row in read_metrics(tmp_path / "run" / "metrics.csv"):
        assert np.isfinite(float(row["value"])), row
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["tasks"]["bin"]["allow_missing"] is True and resolved["tasks"]["reg"]["allow_missing"] is False


def test_string_labels_round_trip_through_predict(files_run, tmp_path):
    new = table(40, 7).drop(columns=["y_reg", "y_bin", "y_cls"])
    new.to_csv(tmp_path / "new.csv", index=False)
    code, out, err = run_cli("predict", files_run / "run", "--input", tmp_path / "new.csv", "--output", tmp_path / "p.csv")
    assert code == 0, err
    assert json.loads(out) == {"rows": 40, "output": str(tmp_path / "p.csv")}
    pred = pd.read_csv(tmp_path / "p.csv")
    assert list(pred.columns) == ["id", "reg", "bin", "bin_probability", "cls", "cls_probability"] and len(pred) == 40
    assert set(pred["cls"]) <= {"red", "green", "blue"}
    truth = table(40, 7)
    assert (pred["cls"] == truth["y_cls"]).mean() > 0.75
    assert (pred["bin"] == truth["y_bin"]).mean() > 0.8
    # without --output the table goes to stdout
    code, out, _ = run_cli("predict", files_run / "run", "--input", tmp_path / "new.csv")
    assert code == 0 and out.splitlines()[0] == "id,reg,bin,bin_probability,cls,cls_probability" and len(out.splitlines()) == 41


def test_eval_split_without_data_and_missing_run(files_run, tmp_path):
    assert_clean_error(*run_cli("eval", files_run / "run", "--split", "test"), "no 'test' split")
    assert_clean_error(*run_cli("eval", tmp_path / "nothing"), "not a polytask run directory")
    code, out, err = run_cli("eval", files_run / "run", "--split", "val")
    assert code == 0, err
    summary = json.loads((files_run / "run" / "summary.json").read_text())
    printed = {(line.split()[0], line.split()[1]): float(line.split()[2]) for line in out.splitlines()[2:]}
    for task, metrics in summary["tasks"].items():  # the summary was computed on the val split, best model
        for metric, value in metrics.items():
            assert printed[(task, metric)] == pytest.approx(value, abs=1e-4)


# ---------------------------------------------------------------- never corrupt a written run
def test_rerun_without_overwrite_refuses_and_keeps_files(files_copy):
    before = snapshot(files_copy)
    assert_clean_error(*run_cli("train", files_copy / "cfg.yaml", "--quiet"), "already exists", "--overwrite")
    assert snapshot(files_copy) == before


def test_overwrite_with_bad_data_keeps_previous_run(files_copy):
    bad = table(300, 0)
    bad.loc[2, "y_bin"] = 2
    bad.to_csv(files_copy / "train.csv", index=False)
    before = snapshot(files_copy / "run")
    assert_clean_error(*run_cli("train", files_copy / "cfg.yaml", "--quiet", "--overwrite"), "task 'bin'")
    assert snapshot(files_copy / "run") == before


BAD_OVERWRITES = [
    pytest.param(["train.epoch=1"], "unknown key", id="unknown-key"),
    pytest.param(["method.name=nash"], "unknown method", id="unknown-method"),
    pytest.param(["tasks.bin.target=nope"], "target column 'nope'", id="missing-column"),
    pytest.param(["train.monitor=bin/acc"], "no metric 'acc'", id="bad-monitor"),
    pytest.param(["model.encoder={name: mlp, hiden: [8]}"], "no parameter 'hiden'", id="encoder-param"),
    pytest.param(["method={name: static, weights: {bni: 1.0}}"], "unknown task 'bni'", id="static-unknown-task"),
    pytest.param(["method={name: cagrad, c: -1}"], "`c`", id="method-param-value"),
]


@pytest.mark.parametrize(("overrides", "needle"), BAD_OVERWRITES)
def test_overwrite_with_bad_config_keeps_previous_run(files_copy, overrides, needle):
    before = snapshot(files_copy / "run")
    sets = [arg for o in overrides for arg in ("--set", o)]
    assert_clean_error(*run_cli("train", files_copy / "cfg.yaml", "--quiet", "--overwrite", *sets), needle)
    assert snapshot(files_copy / "run") == before


def test_resume_with_incompatible_model_is_refused_and_keeps_the_run(files_copy):
    before = snapshot(files_copy / "run")
    code, out, err = run_cli("train", files_copy / "cfg.yaml", "--quiet", "--resume", "--set", "train.epochs=4",
                             "--set", "model.encoder={name: mlp, hidden: [8]}")
    assert_clean_error(code, out, err, "checkpoint")
    assert snapshot(files_copy / "run") == before


def test_overwrite_replaces_run_files_only(files_copy):
    (files_copy / "run" / "notes.txt").write_text("mine")
    (files_copy / "run" / "checkpoints" / "extra.pt").write_bytes(b"x")
    code, _, err = run_cli("train", files_copy / "cfg.yaml", "--quiet", "--overwrite", "--set", "train.epochs=1")
    assert code == 0, err
    assert (files_copy / "run" / "notes.txt").read_text() == "mine"
    assert json.loads((files_copy / "run" / "summary.json").read_text())["epochs_run"] == 1
    assert {r["epoch"] for r in read_metrics(files_copy / "run" / "metrics.csv")} == {"1"}


def test_resume_and_overwrite_exclude_each_other(files_copy):
    before = snapshot(files_copy / "run")
    assert_clean_error(*run_cli("train", files_copy / "cfg.yaml", "--quiet", "--overwrite", "--resume"), "exclude")
    assert snapshot(files_copy / "run") == before


def test_single_task_baselines_from_files(tmp_path):
    cfg = files_config(tmp_path)
    code, out, err = run_cli("train", cfg, "--single-task", "--quiet", "--set", "train.epochs=2")
    assert code == 0, err
    for task in ("reg", "bin", "cls"):
        assert any(line.split()[:1] == [task] for line in out.splitlines()), out
        summary = json.loads((tmp_path / "run" / "single_task" / task / "summary.json").read_text())
        assert list(summary["tasks"]) == [task] and summary["method"] == "equal"
    assert not (tmp_path / "run" / "summary.json").exists()  # only the baselines ran


# ------------------------------------------------------------------------------- bundled data
def test_adult_with_baselines_prints_metrics_and_delta_m(adult_run):
    folder, out = adult_run
    lines = out.splitlines()
    assert any("single-task" in line and "multi-task" in line for line in lines)
    for task in ("income", "marital"):
        for metric in ("accuracy", "f1", "auroc"):
            assert any(line.split()[:2] == [task, metric] for line in lines), (task, metric)
    assert any(line.startswith("Δm = ") for line in lines)
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["baselines"]) == {"income", "marital"}
    assert summary["tasks"]["income"]["auroc"] > 0.8 and summary["tasks"]["marital"]["auroc"] > 0.8
    main_metrics = {"income": "accuracy", "marital": "accuracy"}
    assert summary["main_metrics"] == main_metrics
    assert summary["delta_m"] == pytest.approx(pt.delta_m(summary["tasks"], summary["baselines"], main_metrics))
    assert f"Δm = {summary['delta_m']:+.2f}%" in out
    for task in ("income", "marital"):
        single = json.loads((folder / "single_task" / task / "summary.json").read_text())
        assert single["tasks"][task] == summary["baselines"][task]


def test_eval_test_split_prints_metrics(adult_run):
    folder, _ = adult_run
    code, out, err = run_cli("eval", folder, "--split", "test")
    assert code == 0, err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["split"] == "test"
    printed = {(line.split()[0], line.split()[1]): float(line.split()[2]) for line in out.splitlines()[2:]}
    for task in ("income", "marital"):
        for metric, value in summary["tasks"][task].items():
            assert printed[(task, metric)] == pytest.approx(value, abs=1e-4)


def test_predict_on_raw_adult_rows(adult_run, tmp_path):
    folder, _ = adult_run
    raw = pd.read_parquet(ADULT_FILE.path()).iloc[:300]
    raw.drop(columns=["income", "marital-status", "relationship"]).to_csv(tmp_path / "people.csv", index=False)
    code, out, err = run_cli("predict", folder, "--input", tmp_path / "people.csv", "--output", tmp_path / "out.csv")
    assert code == 0, err
    assert json.loads(out)["rows"] == 300
    pred = pd.read_csv(tmp_path / "out.csv")
    assert list(pred.columns) == ["id", "income", "income_probability", "marital", "marital_probability"] and len(pred) == 300
    probs = pred[["income_probability", "marital_probability"]]
    assert pred.notna().all().all() and ((probs >= 0) & (probs <= 1)).all().all()
    assert pred["income_probability"].std() > 0.01  # not a constant
    # a table without one of the features is refused with the column named
    raw[[c for c in FEATURES if c != "age"]].to_csv(tmp_path / "partial.csv", index=False)
    assert_clean_error(*run_cli("predict", folder, "--input", tmp_path / "partial.csv"), "'age'")


def test_predict_on_raw_adult_rows_matches_the_training_inputs(adult_run, tmp_path):
    """Raw rows through `predict` must give what the model gives on the same rows as loaded for training."""
    folder, _ = adult_run
    loaded = pt.datasets.load("adult")
    train_idx, _, _ = split_indices(len(pd.read_parquet(ADULT_FILE.path())), (0.15, 0.15), 0)
    rows = train_idx[:400].numpy()
    raw = pd.read_parquet(ADULT_FILE.path()).iloc[rows]
    assert ((raw["income"] == ">50K").to_numpy() == loaded.train.targets["income"][:400].numpy().astype(bool)).all()
    assert (raw["capital-gain"] > 0).any()
    raw.to_csv(tmp_path / "raw.csv", index=False)
    np.save(tmp_path / "x.npy", loaded.train.x[:400].numpy())
    for name in ("raw.csv", "x.npy"):
        code, _, err = run_cli("predict", folder, "--input", tmp_path / name, "--output", tmp_path / f"{name}.out.csv")
        assert code == 0, err
    from_raw, from_x = pd.read_csv(tmp_path / "raw.csv.out.csv"), pd.read_csv(tmp_path / "x.npy.out.csv")
    np.testing.assert_allclose(from_raw.to_numpy(), from_x.to_numpy(), atol=1e-5)


def test_resume_continues_a_cli_run(adult_run, tmp_path):
    source, _ = adult_run
    folder = tmp_path / "run"
    shutil.copytree(source, folder)
    first = (folder / "metrics.csv").read_text()
    code, out, err = run_cli("train", ADULT_YAML, "--resume", "--quiet", "--set", f"output_dir={folder}",
                             "--set", "train.epochs=2", "--set", "train.batch_size=1024")
    assert code == 0, err
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["epochs_run"] == 2
    metrics = (folder / "metrics.csv").read_text()
    assert metrics.startswith(first)  # epoch 1 kept as it was, epoch 2 appended
    assert {r["epoch"] for r in read_metrics(folder / "metrics.csv")} == {"1", "2"}
    assert torch.load(folder / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 2
    # resuming a finished run trains nothing more
    code, _, err = run_cli("train", ADULT_YAML, "--resume", "--quiet", "--set", f"output_dir={folder}",
                           "--set", "train.epochs=2", "--set", "train.batch_size=1024")
    assert code == 0, err
    assert (folder / "metrics.csv").read_text() == metrics


def test_resume_without_a_run_is_refused(tmp_path):
    code, out, err = run_cli("train", ADULT_YAML, "--resume", *FAST, "--set", f"output_dir={tmp_path / 'none'}")
    assert_clean_error(code, out, err, "cannot resume")


def test_multimnist_trains_one_epoch_on_a_reduced_size(tmp_path):
    folder = tmp_path / "mm"
    code, out, err = run_cli("train", MULTIMNIST_YAML, "--quiet", "--set", f"output_dir={folder}",
                             "--set", "train.epochs=1", "--set", "data.options.train_size=500",
                             "--set", "data.options.val_size=100", "--set", "data.options.test_size=100")
    assert code == 0, err
    summary = json.loads((folder / "summary.json").read_text())
    assert set(summary["tasks"]) == {"left", "right"} and summary["split"] == "test"
    for task in ("left", "right"):
        assert 0.0 <= summary["tasks"][task]["accuracy"] <= 1.0
        assert np.isfinite(summary["tasks"][task]["loss"])
    steps = (folder / "steps.csv").read_text().splitlines()
    assert len(steps) == 1 + 2 * 4  # header + (500 / 128 → 4 steps) × 2 tasks
    resolved = yaml.safe_load((folder / "config.yaml").read_text())
    assert resolved["data"]["options"] == {"train_size": 500, "val_size": 100, "test_size": 100}


def test_list_prints_registry_names():
    code, out, _ = run_cli("list")
    assert code == 0
    for section in ("methods:", "architectures:", "encoders:", "samplers:", "datasets:", "metrics:"):
        assert section + "\n" in out
    for name in ("hard_sharing", "mlp", "cnn", "proportional", "temperature", "adult", "multimnist", "auroc"):
        assert f"  {name} " in out
    code, out, _ = run_cli("list", "methods")
    assert code == 0 and out.startswith("methods:\n") and "architectures:" not in out
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == METHODS.names() and {"equal", "static", "pcgrad", "nash_mtl", "mgda"} <= set(listed)
    assert "[needs gramian]" in out and "[needs losses]" in out


def test_list_shows_the_rl_encoders_and_environments():
    from polytask.rl.encoders import RL_ENCODERS
    from polytask.rl.envs.registry import ENVIRONMENTS

    for what, registry in (("rl_encoders", RL_ENCODERS), ("rl_environments", ENVIRONMENTS)):
        code, out, _ = run_cli("list", what)
        assert code == 0 and out.startswith(f"{what}:\n")
        assert [line.split()[0] for line in out.splitlines()[1:]] == registry.names()
    code, out, _ = run_cli("list", "rl_encoders", "care")
    assert code == 0 and out.startswith("care (rl encoder)\n") and "  experts: int = 4" in out
    code, out, _ = run_cli("list")
    assert "rl_encoders:\n" in out and "  care " in out and "rl_environments:\n" in out and "  pendulum " in out
