"""A new user's first day with their own data (issue 20, the data side).

Each malformed input must stop with one error naming the task, the column, the file's own row
(``line N of FILE (header = line 1)`` for CSV, ``row N of FILE (first data row = 1)`` for
Parquet) and what was expected, before anything is trained or written; or follow a stated rule
(strict JSON in the run directory, duplicate YAML keys refused).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import polytask as pt
from polytask.cli.main import main
from polytask.config.yaml_io import safe_load_unique
from polytask.core.errors import ConfigError, DataError
from polytask.data.dataset import MultiOutputDataset
from polytask.data.files import label_vocabulary, locate_row, read_table, targets_from
from polytask.datasets.base import split_indices
from polytask.train.rundir import RunDir, strict_json

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = {"reg": {"kind": "regression", "target": "y_reg"},
         "bin": {"kind": "binary", "target": "y_bin"},
         "cls": {"kind": "multiclass", "target": "y_cls", "num_classes": 3}}


def table(n: int, seed: int = 0) -> pd.DataFrame:
    r = np.random.default_rng(seed)
    f1, f2 = r.normal(size=n), r.normal(size=n)
    cat = r.choice(["a", "b", "c"], size=n)
    return pd.DataFrame({"f1": f1, "f2": f2, "cat": cat, "y_reg": 2 * f1 - f2, "y_bin": (f1 + f2 > 0).astype(int),
                         "y_cls": np.where(cat == "a", "red", np.where(f1 > 0, "green", "blue"))})


def config(folder: Path, train: Path, val: Path | None = None, tasks: dict | None = None) -> Path:
    """A config with nothing but data and tasks: every error here comes before training starts."""
    files = {"train": str(train), **({"val": str(val)} if val is not None else {})}
    raw = {"seed": 0, "output_dir": str(folder / "run"), "data": {"files": files}, "tasks": tasks or TASKS}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def train_error(folder: Path, train: Path, val: Path | None = None, tasks: dict | None = None) -> str:
    """``polytask train`` must fail with exit code 2, one ``error:`` line and no run directory."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", str(config(folder, train, val, tasks)), "--quiet"])
    message = err.getvalue()
    assert code == 2, (code, out.getvalue(), message)
    assert message.startswith("error: ") and "Traceback" not in message, message
    assert not (folder / "run").exists(), "a run refused for its data writes nothing"
    return message


def csv(folder: Path, frame: pd.DataFrame, name: str = "train.csv") -> Path:
    path = folder / name
    frame.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------- 1. a header and no rows
def test_header_only_csv_is_refused(tmp_path):
    """Before: a regression task trained on 0 rows and wrote an empty summary."""
    path = csv(tmp_path, table(0))
    assert path.read_text().strip() == "f1,f2,cat,y_reg,y_bin,y_cls"
    message = train_error(tmp_path, path, tasks={"reg": TASKS["reg"]})
    assert f"data file {path} has no data rows" in message
    assert "only the header: f1, f2, cat, y_reg, y_bin, y_cls" in message and "expected at least one row" in message


# ------------------------------------------------------------ 2. too few rows for a split
def test_three_rows_cannot_give_a_validation_split(tmp_path):
    """Before: int(3 × 0.15) = 0 validation rows; the run trained and reported no metric at all."""
    message = train_error(tmp_path, csv(tmp_path, table(3)), tasks={"reg": TASKS["reg"]})
    assert "has 3 rows, too few to hold out a validation share of 0.15" in message
    assert "int(3 × 0.15) = 0 rows" in message and "expected at least 7 rows" in message


@pytest.mark.parametrize("fraction", [0.15, 0.1, 0.3, 0.7, 0.01, 1 / 3])
def test_the_stated_minimum_is_exact(fraction):
    """The message's "at least N rows" is the smallest N whose share is one row."""
    with pytest.raises(DataError, match=r"expected at least (\d+) rows") as info:
        split_indices(1, (fraction, 0.0), seed=0)
    need = int(re.search(r"at least (\d+) rows", str(info.value)).group(1))
    assert len(split_indices(need, (fraction, 0.0), seed=0)[1]) == 1
    with pytest.raises(DataError, match="too few"):
        split_indices(need - 1, (fraction, 0.0), seed=0)


def test_split_indices_is_unchanged_where_it_worked():
    train, val, test = split_indices(100, (0.15, 0.15), seed=3)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(val, order[:15]) and torch.equal(test, order[15:30]) and torch.equal(train, order[30:])
    assert len(split_indices(5, (0.0, 0.0), seed=0)[0]) == 5  # no share asked for: none held out


def test_empty_data_set_is_refused_by_validate():
    ds = MultiOutputDataset(torch.zeros(0, 3), {"a": torch.zeros(0)})
    with pytest.raises(DataError, match=r"val data has no rows: inputs `x` have shape \(0, 3\); expected at least one"):
        ds.validate([pt.Task("a", kind="regression")], where="val data")


# ------------------------------------------------------------------- 3. a task with no label
def test_task_with_no_labelled_row_is_refused(tmp_path):
    """Before: with allow_missing, an all-empty column trained and the task vanished from the results."""
    frame = table(100)
    frame["y_bin"] = np.nan
    tasks = {"reg": TASKS["reg"], "bin": {**TASKS["bin"], "allow_missing": True}}
    message = train_error(tmp_path, csv(tmp_path, frame), tasks=tasks)
    assert "task 'bin' has no labelled row: target column(s) 'y_bin' are empty in all 85 rows given here (of 100 in " \
           "the file)" in message
    assert "expected at least one label" in message


def test_task_with_no_labelled_row_in_the_validation_split_names_the_file(tmp_path):
    frame = table(100)
    train_idx, val_idx, _ = split_indices(100, (0.15, 0.0), seed=0)
    frame.loc[val_idx.numpy(), "y_bin"] = np.nan  # labels only where the split puts training rows
    tasks = {"reg": TASKS["reg"], "bin": {**TASKS["bin"], "allow_missing": True}}
    path = csv(tmp_path, frame)
    message = train_error(tmp_path, path, tasks=tasks)
    assert f"validation data: task 'bin' has no labelled row: target column(s) 'y_bin' are empty in all 15 rows " \
           f"given here (of 100 in {path})" in message


def test_multilabel_task_with_no_complete_row_is_refused():
    """A multilabel row counts as labelled only when all its label columns are: none here is."""
    frame = pd.DataFrame({"l1": [1.0, np.nan, 0.0], "l2": [np.nan, 1.0, np.nan]})
    task = pt.Task("tags", kind="multilabel", num_classes=2)
    with pytest.raises(DataError, match=r"task 'tags' has no labelled row: target column\(s\) 'l1', 'l2' are empty in all 3"):
        targets_from(frame, task, ["l1", "l2"], None, True, "data")
    frame["l2"] = np.nan
    with pytest.raises(DataError, match=r"target column\(s\) 'l2' are empty in all 3 rows"):
        targets_from(frame, task, ["l1", "l2"], None, True, "data")


def test_all_false_mask_is_refused_by_validate():
    ds = MultiOutputDataset(torch.randn(4, 2), {"a": torch.zeros(4), "b": torch.zeros(4)},
                            {"b": torch.zeros(4, dtype=torch.bool)})
    with pytest.raises(DataError, match=r"task 'b' has no labelled row \(its mask is False for all 4 rows\)"):
        ds.validate([pt.Task("a", kind="regression"), pt.Task("b", kind="binary")])


# --------------------------------------------------------------------- 4. a repeated column
def test_duplicate_csv_column_is_refused(tmp_path):
    """Before: pandas renamed the second 'carat' to 'carat.1' and it became a feature."""
    path = tmp_path / "train.csv"
    rows = ["carat,cut,price,carat"] + [f"{0.2 + i / 100},{'ab'[i % 2]},{300 + i},{i}" for i in range(50)]
    path.write_text("\n".join(rows) + "\n")
    assert list(pd.read_csv(path).columns) == ["carat", "cut", "price", "carat.1"]  # what pandas would do
    message = train_error(tmp_path, path, tasks={"price": {"kind": "regression", "target": "price"}})
    assert f"data file {path} has two columns named 'carat' (columns 1 and 4 of the header)" in message
    assert "'carat.1'" in message and "rename or drop one" in message


def test_distinct_column_names_that_look_mangled_are_kept(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,a.1,,\n1,2,3,4\n")  # 'a.1' written by the user; empty names are pandas' "Unnamed: N"
    assert list(read_table(path).columns) == ["a", "a.1", "Unnamed: 2", "Unnamed: 3"]


# ------------------------------------------------------------------ 5. the file's own rows
def test_error_names_the_file_line_not_the_shuffled_row(tmp_path):
    """Before: a value on line 7 of the file was reported as "row 411", its place after the shuffle."""
    frame = table(600)
    frame.loc[5, "y_reg"] = np.nan  # data row 6, line 7 (the header is line 1)
    path = csv(tmp_path, frame)
    message = train_error(tmp_path, path)
    train_idx, _, _ = split_indices(600, (0.15, 0.0), seed=0)
    assert 5 in train_idx.tolist() and train_idx.tolist().index(5) != 5  # it really moved in the shuffle
    assert f"{path}: target column 'y_reg' of task 'reg' has a missing value at line 7 (header = line 1)" in message


def test_validation_split_rows_are_lines_of_the_training_file(tmp_path):
    frame = table(600)
    _, val_idx, _ = split_indices(600, (0.15, 0.0), seed=0)
    row = int(val_idx[3])
    frame.loc[row, "f2"] = np.nan
    path = csv(tmp_path, frame)
    message = train_error(tmp_path, path)
    assert f"validation data column 'f2' has a missing value at line {row + 2} of {path} " \
           "(header = line 1)" in message


def test_non_numeric_feature_in_a_validation_file_names_value_and_line(tmp_path):
    val = table(50, 1)
    val["f2"] = val["f2"].astype(object)
    val.loc[9, "f2"] = "oops"
    val_path = csv(tmp_path, val, "val.csv")
    message = train_error(tmp_path, csv(tmp_path, table(100)), val=val_path)
    assert f"column 'f2' has a non-numeric value 'oops' at line 11 of {val_path} (header = line 1); expected a number" \
           in message


def test_lines_count_blank_lines_and_multiline_cells(tmp_path):
    """The line an editor shows: a quoted cell over three lines and blank lines (both skipped or
    folded by pandas) still count."""
    path = tmp_path / "t.csv"
    path.write_text('f1,note,y\n1,"a\nlong\nnote",0.5\n\n2,plain,0.1\n   \n3,x,\n4,y,0.2\n')
    frame = read_table(path)
    assert len(frame) == 4
    task = pt.Task("y", kind="regression")
    with pytest.raises(DataError, match=r"missing value at line 8 of .*t\.csv \(header = line 1\)"):
        targets_from(frame.iloc[[3, 2, 1, 0]], task, "y", None, False, "data")
    assert locate_row(frame, 0) == f"line 2 of {path} (header = line 1)"
    assert locate_row(frame, 1) == f"line 6 of {path} (header = line 1)"


def test_parquet_rows_are_one_based_data_rows(tmp_path):
    frame = table(50).set_index("f1")  # a stored index: rows are still counted from the file's first data row
    frame.iloc[9, frame.columns.get_loc("y_reg")] = np.nan
    path = tmp_path / "t.parquet"
    frame.to_parquet(path)
    message = train_error(tmp_path, path, val=path, tasks={"reg": TASKS["reg"]})
    assert f"{path}: target column 'y_reg' of task 'reg' has a missing value at row 10 (first data row = 1)" in message


def test_numeric_label_out_of_range_names_the_line(tmp_path):
    frame = table(300)
    frame["y_cls"] = frame["y_cls"].map({"red": 0, "green": 1, "blue": 2})
    frame.loc[11, "y_cls"] = 3
    path = csv(tmp_path, frame)
    message = train_error(tmp_path, path, val=path)
    assert (f"{path}: target column 'y_cls' of multiclass task 'cls' has label 3 at line 13 (header = line 1); "
            "expected an integer in [0, 2] (num_classes: 3)") in message


def test_python_frames_name_their_index_label():
    frame = pd.DataFrame({"y": [1.0, np.nan]}, index=["first", "second"])
    with pytest.raises(DataError, match="missing value at the row with index label 'second'"):
        targets_from(frame, pt.Task("y", kind="regression"), "y", None, False, "data")


# ------------------------------------------------------------------ 6. labels as written
def test_too_many_string_labels_are_named_as_written(tmp_path):
    """Before: "train data targets of task 'cls' must lie in [0, 2]; found label 3" (an internal code)."""
    frame = table(100)
    frame.loc[3, "y_cls"] = "purple"
    path = csv(tmp_path, frame)
    message = train_error(tmp_path, path)
    assert "multiclass task 'cls' has 4 distinct labels in target column 'y_cls'" in message
    assert "expected at most 3 (tasks.cls.num_classes)" in message
    assert f"The rarest, 'purple', is first at line 5 of {path} (header = line 1)" in message
    assert "'purple' (1)" in message and "label 3" not in message


def test_binary_string_labels_are_named_as_written(tmp_path):
    frame = table(100)
    frame["y_bin"] = np.where(frame["y_bin"] == 1, "yes", "no")
    frame.loc[8, "y_bin"] = "maybe"
    message = train_error(tmp_path, csv(tmp_path, frame), tasks={"bin": TASKS["bin"]})
    assert "binary task 'bin' has 3 distinct labels in target column 'y_bin'" in message
    assert "expected 2" in message and "'maybe', is first at line 10" in message


def test_unseen_string_label_names_the_line(tmp_path):
    train, val = table(300, 0), table(120, 1)
    val.loc[4, "y_cls"] = "purple"
    message = train_error(tmp_path, csv(tmp_path, train), val=csv(tmp_path, val, "val.csv"))
    assert f"task 'cls' has label 'purple' at line 6 of {tmp_path / 'val.csv'} (header = line 1), not seen in training" \
           in message and "expected one of: blue, green, red" in message


def test_string_labels_still_load():
    frame = table(30)
    task = pt.Task("cls", kind="multiclass", num_classes=3)
    labels = label_vocabulary(frame, task, "y_cls")
    assert labels == ["blue", "green", "red"]
    y, _ = targets_from(frame, task, "y_cls", labels, False, "data")
    assert [labels[int(v)] for v in y] == frame["y_cls"].tolist()


# -------------------------------------------------------------------- 7. uint8 image inputs
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.bool])
def test_inputs_no_encoder_takes_are_refused_with_the_conversion(dtype):
    """Before: the first forward pass failed inside torch ("Input type (unsigned char) and bias type (float)...")."""
    ds = MultiOutputDataset(torch.zeros(6, 1, 8, 8, dtype=dtype), {"digit": torch.zeros(6, dtype=torch.long)})
    with pytest.raises(DataError, match=rf"train data inputs `x` have dtype {dtype}, which no polytask encoder takes") as info:
        ds.validate([pt.Task("digit", kind="multiclass", num_classes=10)], where="train data")
    assert "x = x.float() / 255" in str(info.value) and "x.long()" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64, torch.int32])
def test_float_and_id_inputs_pass(dtype):
    MultiOutputDataset(torch.zeros(3, 4, dtype=dtype), {"a": torch.zeros(3)}).validate([pt.Task("a", kind="regression")])


# ------------------------------------------------------------------ 8. strict JSON on disk
def _strict(constant: str) -> None:
    raise ValueError(f"non-standard JSON constant {constant}")


def test_run_directory_json_is_strict(tmp_path):
    """Before: json.dumps wrote NaN / Infinity, which strict parsers reject."""
    run = RunDir(tmp_path)
    summary = {"tasks": {"reg": {"loss": math.inf, "rmse": math.nan, "r2": -math.inf, "mae": 1.5}},
               "history": [math.nan, 2.0, (math.inf, 3)], "best_epoch": 1, "method": "equal", "score": np.float64("nan")}
    run.write_json("summary.json", summary)
    text = (tmp_path / "summary.json").read_text()
    back = json.loads(text, parse_constant=_strict)
    assert back["tasks"]["reg"] == {"loss": None, "rmse": None, "r2": None, "mae": 1.5}
    assert back["history"] == [None, 2.0, [None, 3]] and back["score"] is None and back["best_epoch"] == 1
    with pytest.raises(ValueError, match="non-standard"):  # the check itself works
        json.loads(json.dumps({"a": math.nan}), parse_constant=_strict)
    assert summary["tasks"]["reg"]["loss"] == math.inf, "the caller's dict is left as it was"


def test_strict_json_keeps_finite_values():
    value = {"a": [1, 2.5, "x", None, True], "b": {"c": 0.0}}
    assert strict_json(value) == value


def test_huge_regression_targets_are_refused_before_training(tmp_path):
    """1e30 targets made every loss inf (the source of the non-finite summary)."""
    frame = table(100)
    frame.loc[2, "y_reg"] = 1e30
    path = csv(tmp_path, frame)
    message = train_error(tmp_path, path, val=path, tasks={"reg": TASKS["reg"]})
    assert "target column 'y_reg' of regression task 'reg' has value 1e+30 at line 4 (header = line 1)" in message
    assert "magnitude below 1.8e+19" in message and "rescale" in message


def test_features_too_large_to_standardise_are_refused_with_their_line(tmp_path):
    """Before: a 1e300 made the column's std inf, so the whole column was scaled to zeros."""
    frame = table(100)
    frame.loc[6, "f1"] = 1e300
    path = csv(tmp_path, frame)
    message = train_error(tmp_path, path, val=path, tasks={"reg": TASKS["reg"]})
    assert f"column 'f1' has value 1e+300 at line 8 of {path} (header = line 1), too large to standardise" in message


def test_features_beyond_float32_after_scaling_are_refused_with_their_line(tmp_path):
    """A validation value whose standardised form is beyond float32 would be an inf input."""
    val = table(50, 1)
    val.loc[3, "f1"] = 1e39
    val_path = csv(tmp_path, val, "val.csv")
    message = train_error(tmp_path, csv(tmp_path, table(100)), val=val_path, tasks={"reg": TASKS["reg"]})
    assert f"column 'f1' has value 1e+39 at line 5 of {val_path} (header = line 1), which cannot be standardised " \
           "to a finite float32" in message


# --------------------------------------------------------------- 9. duplicate keys in YAML
def test_duplicate_yaml_key_names_key_and_lines():
    text = "seed: 0\ntrain:\n  epochs: 3\n  lr: 0.01\n  epochs: 30\n"
    assert yaml.safe_load(text)["train"]["epochs"] == 30  # what PyYAML does: the last one wins, silently
    with pytest.raises(ConfigError, match=r"^config file a\.yaml: key 'epochs' is given twice in the same mapping "
                                          r"\(lines 3 and 5\); expected each key once"):
        safe_load_unique(text, "config file a.yaml")


@pytest.mark.parametrize(("text", "where"), [
    (b"a: 1\nb: 2\na: 3\n", "lines 1 and 3"),                      # bytes, as read from a file
    ("m: {x: 1, x: 2}\n", "line 1, columns 5 and 11"),             # a flow mapping
    ("tasks:\n  - {kind: binary, kind: regression}\n", "line 2, columns 6 and 20"),
    ("1: a\n1.0: b\n", "lines 1 and 2"),                           # equal as keys once loaded
])
def test_duplicate_yaml_keys_anywhere(text, where):
    with pytest.raises(ConfigError, match=re.escape(where)):
        safe_load_unique(text, "config")


def test_unique_yaml_loads_like_safe_load():
    text = "base: &b {lr: 0.1, epochs: 2}\ntrain:\n  <<: *b\n  epochs: 5\nlist: [1, 2.5, null, yes]\n"
    assert safe_load_unique(text, "config") == yaml.safe_load(text)
    assert safe_load_unique(text.encode("utf-16"), "config") == yaml.safe_load(text)
    assert safe_load_unique("", "config") is None


def test_invalid_yaml_is_a_config_error():
    with pytest.raises(ConfigError, match=r"^config file b\.yaml is not valid YAML: "):
        safe_load_unique("data: {dataset: adult\n", "config file b.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        safe_load_unique("!!python/object/apply:os.system ['true']\n", "config")  # still safe
