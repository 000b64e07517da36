"""Read CSV / Parquet / NumPy files into multi-task data sets with a column → task mapping."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError, closest
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset
from polytask.data.tabular import TabularPreprocessor

READERS = {".csv": pd.read_csv, ".parquet": pd.read_parquet, ".pq": pd.read_parquet, ".gz": pd.read_csv,
           ".brotli": pd.read_parquet}


def read_table(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    reader = READERS.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"cannot read {p}: expected one of {', '.join(sorted(READERS))}")
    try:
        return reader(p)
    except (ValueError, OSError) as exc:
        raise DataError(f"cannot read {p}: {exc}") from exc


def label_vocabulary(frame: pd.DataFrame, task: Task, column: str | Sequence[str]) -> list[str] | None:
    """Sorted string labels of a classification column with text labels (None if numeric)."""
    if not isinstance(column, str):  # multilabel: one 0/1 column per label
        for name in column:
            require_column(frame, task, name, "training data")
        return None
    require_column(frame, task, column, "training data")
    values = frame[column].dropna()
    if task.kind in ("binary", "multiclass") and not pd.api.types.is_numeric_dtype(values):
        return sorted(map(str, values.unique()))
    return None


def require_column(frame: pd.DataFrame, task: Task, column: str, where: str) -> None:
    if column not in frame.columns:
        raise DataError(f"{where}: target column '{column}' of task '{task.name}' not found."
                        f"{closest(column, map(str, frame.columns))} Columns: {', '.join(map(str, frame.columns))}")


def targets_from(frame: pd.DataFrame, task: Task, column: str | Sequence[str], labels: Sequence[str] | None,
                 allow_missing: bool, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Target tensor (and mask of known labels when missing values are allowed) for one task.

    A multilabel task reads one 0/1 column per label (``target: [col1, col2, ...]``); a row with
    any label missing counts as unlabelled for that task.
    """
    if not isinstance(column, str):
        parts = [targets_from(frame, task, name, None, allow_missing, where) for name in column]
        values = torch.stack([p[0] for p in parts], dim=1)
        masks = [p[1] for p in parts if p[1] is not None]
        return values, torch.stack(masks).all(0) if masks else None
    require_column(frame, task, column, where)
    series = frame[column]
    missing = series.isna().to_numpy()
    if missing.any() and not allow_missing:
        raise DataError(f"{where}: target column '{column}' of task '{task.name}' has a missing value at row "
                        f"{int(missing.nonzero()[0][0])}; set `allow_missing: true` for that task to mask them")
    if labels is not None:
        lookup = {v: i for i, v in enumerate(labels)}
        unknown = [v for v in series.dropna().astype(str).unique() if v not in lookup]
        if unknown:
            raise DataError(f"{where}: task '{task.name}' has label {unknown[0]!r} not seen in training; "
                            f"known labels: {', '.join(labels)}")
        values = np.array([lookup.get(str(v), 0) if not m else 0 for v, m in zip(series, missing)], dtype=np.float32)
    else:
        values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float32)
        bad = np.isnan(values) & ~missing
        if bad.any():
            raise DataError(f"{where}: target column '{column}' of task '{task.name}' has a non-numeric value at row "
                            f"{int(bad.nonzero()[0][0])}")
        values = np.where(missing, 0.0, values).astype(np.float32)
    mask = torch.from_numpy(~missing) if allow_missing else None
    return torch.from_numpy(values), mask


def table_dataset(frame: pd.DataFrame, tasks: Sequence[Task], columns: Mapping[str, str | Sequence[str]],
                  prep: TabularPreprocessor, labels: Mapping[str, Sequence[str] | None],
                  allow_missing: Mapping[str, bool], where: str) -> MultiOutputDataset:
    for col in prep.numeric:
        if col in frame.columns:
            infinite = np.isinf(pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64))
            if infinite.any():
                raise DataError(f"{where} column '{col}' has an infinite value at row {int(infinite.nonzero()[0][0])}; "
                                "expected finite numbers")
    x = prep.transform(frame, where=where)
    targets, masks = {}, {}
    for task in tasks:
        y, mask = targets_from(frame, task, columns[task.name], labels.get(task.name),
                               allow_missing.get(task.name, False), where)
        targets[task.name] = y
        if mask is not None:
            masks[task.name] = mask
    return MultiOutputDataset(x, targets, masks)
