"""Turn a table into a float feature matrix: standardised numbers, one-hot categories (or their codes)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from polytask.core.errors import DataError

ENCODINGS = ("onehot", "codes")

logger = logging.getLogger("polytask")


class TabularPreprocessor:
    """Fit on the training table, then transform any table with the same columns.

    Numeric columns are standardised with the training mean and standard deviation; categorical
    columns (string, categorical or boolean dtype) become one-hot blocks over the training
    categories plus one "unseen" slot. Columns in ``log1p`` (heavy-tailed counts such as capital
    gains) are mapped through log(1 + x) before standardising. With ``encoding="codes"`` each
    categorical column becomes one column holding its category's index instead (the unseen slot is
    the last index), for encoders that learn embeddings (``tabular``): numbers first, then codes,
    as floats. The fitted state is plain JSON (``to_dict``), so a run
    directory can rebuild it for ``polytask predict`` without pickles.
    """

    def __init__(self, numeric: Sequence[str] = (), categorical: Sequence[str] = (),
                 means: Mapping[str, float] | None = None, stds: Mapping[str, float] | None = None,
                 categories: Mapping[str, Sequence[str]] | None = None, log1p: Sequence[str] = (),
                 encoding: str = "onehot") -> None:
        if encoding not in ENCODINGS:
            raise DataError(f"`encoding` of categorical columns must be one of {', '.join(ENCODINGS)}; found {encoding!r}")
        self.encoding = encoding
        self.log1p = list(log1p)
        self.numeric = list(numeric)
        self.categorical = list(categorical)
        self.means = dict(means or {})
        self.stds = dict(stds or {})
        self.categories = {k: list(v) for k, v in (categories or {}).items()}

    @classmethod
    def fit(cls, frame: pd.DataFrame, features: Sequence[str], log1p: Sequence[str] = (),
            encoding: str = "onehot") -> TabularPreprocessor:
        missing = [c for c in features if c not in frame.columns]
        if missing:
            raise DataError(f"feature column(s) {missing} not found; columns are: {', '.join(map(str, frame.columns))}")
        numeric, categorical = [], []
        for col in features:
            kind = frame[col].dtype
            if pd.api.types.is_bool_dtype(kind) or not pd.api.types.is_numeric_dtype(kind):
                categorical.append(col)
            else:
                numeric.append(col)
        bad = [c for c in log1p if c not in numeric]
        if bad:
            raise DataError(f"log1p column(s) {bad} are not numeric features")
        values = {c: np.log1p(frame[c].to_numpy(dtype=np.float64)) if c in log1p else frame[c] for c in numeric}
        with np.errstate(over="ignore", invalid="ignore"):
            means = {c: float(np.mean(values[c])) for c in numeric}
            stds = {c: float(np.std(values[c])) or 1.0 for c in numeric}
        for c in numeric:
            # |x| from about 1e154 overflows the variance, and the column would be scaled to all
            # zeros without a word. NaN and inf are left to transform(), which names the first one.
            if not (np.isfinite(means[c]) and np.isfinite(stds[c])):
                column = pd.to_numeric(pd.Series(np.asarray(values[c])), errors="coerce").to_numpy(dtype=np.float64)
                if np.isfinite(column).all():
                    from polytask.data.files import locate_row  # files imports this module: import at call time

                    row = int(np.argmax(np.abs(column)))
                    raise DataError(f"column '{c}' has value {column[row]:g} at {locate_row(frame, row)}, too large "
                                    "to standardise (its variance overflows float64); expected magnitudes below "
                                    "~1e150: rescale the column")
        categories = {c: sorted(map(str, frame[c].dropna().unique())) for c in categorical}
        return cls(numeric, categorical, means, stds, categories, log1p, encoding)

    @property
    def features(self) -> list[str]:
        return self.numeric + self.categorical

    @property
    def out_features(self) -> int:
        if self.encoding == "codes":
            return len(self.numeric) + len(self.categorical)
        return len(self.numeric) + sum(len(v) + 1 for v in self.categories.values())

    @property
    def cardinalities(self) -> list[int]:
        """Number of codes per categorical column (its categories plus the unseen slot)."""
        return [len(self.categories[c]) + 1 for c in self.categorical]

    def transform(self, frame: pd.DataFrame, where: str = "data") -> Tensor:
        missing = [c for c in self.features if c not in frame.columns]
        if missing:
            raise DataError(f"{where} lacks feature column(s) {missing}; expected: {', '.join(self.features)}")
        from polytask.data.files import locate_row  # files imports this module: import at call time

        blocks: list[np.ndarray] = []
        for col in self.numeric:
            values = pd.to_numeric(frame[col], errors="coerce").to_numpy(dtype=np.float64)
            if np.isnan(values).any():
                row = int(np.isnan(values).nonzero()[0][0])
                cell = frame[col].iloc[row]
                what = "a missing value" if pd.isna(cell) else f"a non-numeric value {str(cell)!r}"
                raise DataError(f"{where} column '{col}' has {what} at {locate_row(frame, row, where)}; expected a number")
            raw = values
            if col in self.log1p:
                values = np.log1p(values)
            scaled = (values - self.means[col]) / self.stds[col]
            # Checked in float32, the dtype the model sees: a value whose standardised form overflows
            # (or a training mean/std that overflowed) would otherwise turn into inf/NaN inputs.
            with np.errstate(over="ignore", invalid="ignore"):
                bad = ~np.isfinite(scaled.astype(np.float32))
            if bad.any():
                row = int(bad.nonzero()[0][0])
                raise DataError(f"{where} column '{col}' has value {raw[row]:g} at {locate_row(frame, row, where)}, which "
                                f"cannot be standardised to a finite float32 (training mean {self.means[col]:g}, std "
                                f"{self.stds[col]:g}); expected magnitudes well below 3.4e38: rescale the column")
            blocks.append(scaled[:, None])
        for col in self.categorical:
            cats = self.categories[col]
            codes = pd.Index(cats).get_indexer(frame[col].astype(str)).astype(np.int64)
            unseen = codes < 0
            if unseen.any():  # a stated decision, not a silent one: the rows share the column's unseen slot
                values = frame[col][unseen]
                shown = ", ".join(repr(v) for v in pd.unique(values.astype(str))[:3])
                logger.info("%s column '%s': %d row(s) hold values not seen in training (%s%s); they are encoded "
                               "as the column's unseen category", where, col, int(unseen.sum()), shown,
                               ", …" if values.nunique() > 3 else "")
            codes[unseen] = len(cats)  # unseen or missing category
            if self.encoding == "codes":
                blocks.append(codes[:, None].astype(np.float64))
                continue
            one_hot = np.zeros((len(frame), len(cats) + 1), dtype=np.float64)
            one_hot[np.arange(len(frame)), codes] = 1.0
            blocks.append(one_hot)
        if not blocks:
            raise DataError(f"{where}: no feature columns to encode")
        return torch.from_numpy(np.concatenate(blocks, axis=1).astype(np.float32))

    def to_dict(self) -> dict[str, Any]:
        return {"numeric": self.numeric, "categorical": self.categorical, "means": self.means,
                "stds": self.stds, "categories": self.categories, "log1p": self.log1p, "encoding": self.encoding}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> TabularPreprocessor:
        return cls(**state)
