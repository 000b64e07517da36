"""Read CSV / Parquet / NumPy files into multi-task data sets with a column → task mapping.

Rows in error messages are the file's own, never positions after the train/validation shuffle:

- CSV (also ``.csv.gz``): ``line N of FILE (header = line 1)``, the line number an editor or a
  spreadsheet shows. It counts blank lines and the extra lines of quoted multi-line cells, which
  pandas skips or folds, so it is found by re-reading the file up to that record (on errors only).
- Parquet: ``row N of FILE (first data row = 1)``; the file has no header line.
- A DataFrame built in Python (not read by :func:`read_table`): ``the row with index label X``.

:func:`read_table` tags every frame with its source (``DataFrame.attrs``, which ``iloc``
selections keep) and a fresh 0-based index, so each row's index label is its data-row number in
the file wherever the frame is split or shuffled afterwards.
"""

from __future__ import annotations

import csv
import gzip
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError, closest
from polytask.core.task import Task, infer_num_classes
from polytask.data.dataset import MultiOutputDataset
from polytask.data.tabular import TabularPreprocessor

READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet, ".gz": pd.read_csv,
           ".brotli": pd.read_parquet}
SOURCE = "polytask_source"
"""``DataFrame.attrs`` key: the path a frame was read from (absent for frames built in Python)."""
ROWS = "polytask_rows"
"""``DataFrame.attrs`` key: the number of data rows in that file (a split of it has fewer)."""
CSV_SUFFIXES = (".csv", ".gz")

#: The largest |target| of a regression task: its squared error must stay finite in float32
#: (max 3.4e38, whose square root is 1.8e19); larger targets make every loss inf and every metric NaN.
MAX_REGRESSION_TARGET = math.sqrt(float(np.finfo(np.float32).max))


def read_table(path: str | Path) -> pd.DataFrame:
    """The table in ``path``, with at least one data row and unique column names.

    A header-only file would train on nothing, and pandas silently renames a repeated column
    ``x`` to ``x.1`` (which then becomes a feature), so both are refused here.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    reader = READERS.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"cannot read {p}: expected one of {', '.join(sorted(READERS))}")
    try:
        frame = reader(p)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {p}: {exc}") from exc
    if p.suffix.lower() in CSV_SUFFIXES:
        _check_unique_header(p)
    if len(frame) == 0:
        raise DataError(f"data file {p} has no data rows (only the header: {', '.join(map(str, frame.columns))}); "
                        "expected at least one row of data")
    # Parquet may restore a stored index; row labels must be data-row numbers (see the module docstring).
    frame = frame.reset_index(drop=True)
    frame.attrs[SOURCE] = str(p)
    frame.attrs[ROWS] = len(frame)
    return frame


def _check_unique_header(path: Path) -> None:
    """Refuse a CSV header naming a column twice (pandas would rename the second copy)."""
    try:  # header=None: the header line as data, i.e. the names as written, before pandas de-duplicates them
        names = [str(v) for v in pd.read_csv(path, header=None, nrows=1, dtype=str, keep_default_na=False).iloc[0]]
    except (ValueError, OSError, IndexError):
        return  # the full read succeeded; a header this odd is for that read's own checks
    seen: dict[str, int] = {}
    for position, name in enumerate(names, start=1):
        if not name.strip():
            continue  # empty names become distinct "Unnamed: N" columns
        if name in seen:
            raise DataError(f"data file {path} has two columns named '{name}' (columns {seen[name]} and {position} of "
                            f"the header); pandas would rename the second to '{name}.1' and use it as a feature. "
                            "Expected unique column names: rename or drop one")
        seen[name] = position


def locate_row(frame: pd.DataFrame, position: int, where: str | None = None) -> str:
    """Where the row at ``position`` of ``frame`` is in its file, in the words of the module docstring.

    The file is left out when ``where`` (the message's prefix) already names it.
    """
    label = frame.index[position]
    source = frame.attrs.get(SOURCE)
    if source is None or not isinstance(label, (int, np.integer)):
        return f"the row with index label {label!r}"
    of = "" if where == source else f" of {source}"
    if Path(source).suffix.lower() in CSV_SUFFIXES:
        return f"line {_csv_line(Path(source), int(label))}{of} (header = line 1)"
    return f"row {int(label) + 1}{of} (first data row = 1)"


def _csv_line(path: Path, data_row: int) -> int:
    """Line (1-based, header = line 1 when the file starts with it) where 0-based data row ``data_row`` begins.

    Blank and whitespace-only lines are skipped as pandas skips them; a quoted cell spanning lines
    advances the count as an editor does. Falls back to ``data_row + 2`` if the file cannot be re-read.
    """
    opener = gzip.open if path.suffix.lower() == ".gz" else open
    try:
        with opener(path, "rt", newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.reader(handle)
            records, next_line = -1, 1  # -1: the header is the first record
            for record in reader:
                start, next_line = next_line, reader.line_num + 1
                if not record or (len(record) == 1 and not record[0].strip()):
                    continue
                if records == data_row:
                    return start
                records += 1
    except (OSError, csv.Error, UnicodeError):
        # only called while a DataError is being raised: a file that cannot be re-read gets the
        # line of a file without blank lines or multi-line cells (header + 1-based row)
        return data_row + 2
    return data_row + 2


def label_vocabulary(frame: pd.DataFrame, task: Task, column: str | Sequence[str]) -> list[str] | None:
    """Sorted string labels of a classification column with text labels (None if numeric).

    A binary task needs exactly 2 labels and a multiclass one at most ``num_classes``: the labels
    are named here, as written in the file, rather than by the codes they would become.
    """
    if not isinstance(column, str):  # multilabel: one 0/1 column per label
        for name in column:
            require_column(frame, task, name, "training data")
        return None
    require_column(frame, task, column, "training data")
    values = frame[column].dropna()
    if task.kind not in ("binary", "multiclass") or pd.api.types.is_numeric_dtype(values):
        return None
    text = values.astype(str)
    labels = sorted(text.unique())
    too_many = len(labels) != 2 if task.kind == "binary" else len(labels) > (task.num_classes or len(labels))
    if too_many:
        counts = text.value_counts()
        rarest = str(counts.index[-1])
        known = frame[column].notna().to_numpy()
        first = int(np.flatnonzero(known & (frame[column].astype(str).to_numpy() == rarest))[0])
        listed = ", ".join(f"{label!r} ({n})" for label, n in counts.head(10).items())
        more = f" and {len(counts) - 10} more" if len(counts) > 10 else ""
        want = "2" if task.kind == "binary" else f"at most {task.num_classes} (tasks.{task.name}.num_classes)"
        raise DataError(
            f"{task.kind} task '{task.name}' has {len(labels)} distinct labels in target column '{column}' "
            f"(rows per label: {listed}{more}); expected {want}. The rarest, {rarest!r}, is first at "
            f"{locate_row(frame, first)}")
    return labels


def infer_classes_from_column(frame: pd.DataFrame, task: str, column: str, where: str = "training data") -> int:
    """``num_classes`` of multiclass task ``task`` from its target column, as :func:`label_vocabulary`
    reads it: text labels count their distinct values, numeric ones are codes 0..max (logged on
    the ``polytask`` logger by :func:`polytask.core.task.infer_num_classes`)."""
    if column not in frame.columns:
        raise DataError(f"{where}: target column '{column}' of task '{task}' not found."
                        f"{closest(column, map(str, frame.columns))} Columns: {', '.join(map(str, frame.columns))}")
    values = frame[column].dropna()
    source = f"the training labels in column '{column}'"
    if pd.api.types.is_numeric_dtype(values):
        return infer_num_classes(task, values, source)
    return infer_num_classes(task, sorted(values.astype(str).unique()), source)


def require_column(frame: pd.DataFrame, task: Task, column: str, where: str) -> None:
    if column not in frame.columns:
        raise DataError(f"{where}: target column '{column}' of task '{task.name}' not found."
                        f"{closest(column, map(str, frame.columns))} Columns: {', '.join(map(str, frame.columns))}")


def targets_from(frame: pd.DataFrame, task: Task, column: str | Sequence[str], labels: Sequence[str] | None,
                 allow_missing: bool, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target tensor (and mask of known labels when missing values are allowed) for one task.

    A multilabel task reads one 0/1 column per label (``target: [col1, col2, ...]``); a row with
    any label missing counts as unlabelled for that task. Every value is checked here, where the
    file's row and the label as written are known (see the module docstring): missing, non-numeric,
    non-finite or too large for float32 losses, and class labels outside ``[0, num_classes - 1]``.
    """
    if not isinstance(column, str):
        parts = [targets_from(frame, task, name, None, allow_missing, where) for name in column]
        values = torch.stack([p[0] for p in parts], dim=1)
        masks = [p[1] for p in parts if p[1] is not None]
        mask = torch.stack(masks).all(0) if masks else None
        if mask is not None:
            _require_a_label(frame, task, ", ".join(f"'{c}'" for c in column), mask.numpy(), where)
        return values, mask
    require_column(frame, task, column, where)
    series = frame[column]
    missing = series.isna().to_numpy()
    if missing.any() and not allow_missing:
        raise DataError(f"{where}: target column '{column}' of task '{task.name}' has a missing value at "
                        f"{locate_row(frame, int(missing.nonzero()[0][0]), where)}; set `allow_missing: true` "
                        "for that task to mask them")
    if allow_missing:
        _require_a_label(frame, task, f"'{column}'", ~missing, where)
    if labels is not None:
        lookup = {v: i for i, v in enumerate(labels)}
        text = series.astype(str).to_numpy()
        unknown = np.array([v not in lookup for v in text]) & ~missing
        if unknown.any():
            first = int(unknown.nonzero()[0][0])
            raise DataError(f"{where}: task '{task.name}' has label {text[first]!r} at {locate_row(frame, first, where)}, "
                            f"not seen in training; expected one of: {', '.join(labels)}")
        values = np.array([lookup.get(v, 0) if not m else 0 for v, m in zip(text, missing)], dtype=np.float32)
    else:
        numbers = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.isnan(numbers) & ~missing
        if bad.any():
            first = int(bad.nonzero()[0][0])
            raise DataError(f"{where}: target column '{column}' of task '{task.name}' has a non-numeric value "
                            f"{str(series.iloc[first])!r} at {locate_row(frame, first, where)}; expected a number")
        _check_values(frame, task, column, np.where(missing, 0.0, numbers), where)
        values = np.where(missing, 0.0, numbers).astype(np.float32)
    mask = torch.from_numpy(~missing) if allow_missing else None
    return torch.from_numpy(values), mask


def _require_a_label(frame: pd.DataFrame, task: Task, columns: str, known: np.ndarray, where: str) -> None:
    """A task whose labels are all missing would silently drop out of every result."""
    if len(known) and not known.any():
        raise DataError(f"{where}: task '{task.name}' has no labelled row: target column(s) {columns} are empty in "
                        f"all {len(known)} rows{_rows_of(frame, where)}; expected at least one label, or drop the task")


def _rows_of(frame: pd.DataFrame, where: str) -> str:
    """Which part of its file a frame is, for messages about all of its rows: '' for the whole file."""
    source, total = frame.attrs.get(SOURCE), frame.attrs.get(ROWS)
    if source is None or total is None or (len(frame) == total and where == source):
        return ""
    return f" given here (of {total} in {'the file' if where == source else source})"


def _check_values(frame: pd.DataFrame, task: Task, column: str, values: np.ndarray, where: str) -> None:
    """Numeric targets: finite, within float32 losses (regression), integer codes in range (classes)."""
    if task.kind == "regression":
        bad = ~np.isfinite(values) | (np.abs(values) > MAX_REGRESSION_TARGET)
        if bad.any():
            first = int(bad.nonzero()[0][0])
            raise DataError(
                f"{where}: target column '{column}' of regression task '{task.name}' has value {values[first]:g} at "
                f"{locate_row(frame, first, where)}; expected finite values of magnitude below "
                f"{MAX_REGRESSION_TARGET:.2g} (beyond it the squared error overflows float32): rescale the column")
        return
    high = 1 if task.kind in ("binary", "multilabel") else (task.num_classes or 0) - 1
    bad = ~np.isfinite(values) | (values != np.round(values)) | (values < 0) | (values > high)
    if bad.any():
        first = int(bad.nonzero()[0][0])
        classes = f" (num_classes: {task.num_classes})" if task.kind == "multiclass" else ""
        raise DataError(f"{where}: target column '{column}' of {task.kind} task '{task.name}' has label {values[first]:g} "
                        f"at {locate_row(frame, first, where)}; expected an integer in [0, {high}]{classes}")


def table_dataset(frame: pd.DataFrame, tasks: Sequence[Task], columns: Mapping[str, str | Sequence[str]],
                  prep: TabularPreprocessor | None, labels: Mapping[str, Sequence[str] | None],
                  allow_missing: Mapping[str, bool], where: str, x: torch.Tensor | None = None) -> MultiOutputDataset:
    """The rows of a table as a data set: inputs from ``prep`` (or ``x``, e.g. the images the rows
    name), targets from each task's columns."""
    if len(frame) == 0:  # a split of a file can be empty even though the file is not
        raise DataError(f"{where} has no rows{_rows_of(frame, where)}; expected at least one")
    if x is not None:
        prep = None
    for col in prep.numeric if prep is not None else ():
        if col in frame.columns:
            infinite = np.isinf(pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64))
            if infinite.any():
                raise DataError(f"{where} column '{col}' has an infinite value at "
                                f"{locate_row(frame, int(infinite.nonzero()[0][0]), where)}; expected finite numbers")
    if prep is not None:
        x = prep.transform(frame, where=where)
    assert x is not None, "table_dataset needs a preprocessor or the inputs"
    targets, masks = {}, {}
    for task in tasks:
        y, mask = targets_from(frame, task, columns[task.name], labels.get(task.name),
                               allow_missing.get(task.name, False), where)
        targets[task.name] = y
        if mask is not None:
            masks[task.name] = mask
    return MultiOutputDataset(x, targets, masks)
