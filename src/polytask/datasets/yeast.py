"""Yeast gene functions (Elisseeff & Weston, NeurIPS 2001): 14 binary labels per gene, one task each."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset
from polytask.datasets.base import DATASETS, LoadedData, PackagedFile, select_tasks, split_indices

YEAST_FILE = PackagedFile(
    package="river",
    relative_path="datasets/yeast.csv.gz",
    url="https://raw.githubusercontent.com/online-ml/river/main/river/datasets/yeast.csv.gz",
    sha256="2969cb4bab877a27adcbe17871fa0b378a1e54b98816cd6106b542ee450a1c09",
    install="pip install --no-deps river",
)
FEATURES = [f"Att{i}" for i in range(1, 104)]
LABELS = {f"class{i}": f"Class{i}" for i in range(1, 15)}
AVAILABLE = {name: Task(name, kind="binary") for name in LABELS}


@DATASETS.register("yeast")
def load_yeast(*, tasks: list[str] | None = None, seed: int = 0, val_fraction: float = 0.15,
               test_fraction: float = 0.15, download: bool = True) -> LoadedData:
    """Yeast, 2,417 genes × 103 expression / phylogenetic features, 14 functional classes.

    The MULAN multi-label version (Tsoumakas et al., JMLR 2011), read from the ``river``
    package's ``datasets/yeast.csv.gz``. Each of ``class1`` … ``class14`` is a binary task
    (a gene belongs to 4.2 classes on average; ``class1`` holds 31 % of the genes, ``class14``
    1.4 %). Features are standardised on the training rows. Split: seeded random.
    """
    frame = pd.read_csv(YEAST_FILE.path(download))
    missing = [c for c in [*FEATURES, *LABELS.values()] if c not in frame.columns]
    if missing:
        raise DataError(f"{YEAST_FILE.relative_path} lacks columns {missing[:4]}; expected Att1..Att103 and "
                        f"Class1..Class14 (river 0.26): `{YEAST_FILE.install}==0.26.1`")
    chosen = select_tasks(AVAILABLE, tasks, list(LABELS), "yeast")
    values = frame[FEATURES].to_numpy(dtype=np.float64)
    train_idx, val_idx, test_idx = split_indices(len(frame), (val_fraction, test_fraction), seed, source="yeast")
    train_rows = values[train_idx.numpy()]
    mean, std = train_rows.mean(axis=0), train_rows.std(axis=0)
    x = torch.from_numpy(((values - mean) / np.where(std > 0, std, 1.0)).astype(np.float32))
    targets = {}
    for task in chosen:
        labels = frame[LABELS[task.name]].to_numpy()
        if not np.isin(labels, (0, 1)).all():
            raise DataError(f"yeast column {LABELS[task.name]} (task '{task.name}') must hold 0/1; found "
                            f"{sorted(set(labels.tolist()) - {0, 1})[:3]}")
        targets[task.name] = torch.tensor(labels, dtype=torch.float32)
    full = MultiOutputDataset(x, targets)
    return LoadedData(
        name="yeast", tasks=chosen, train=full.subset(train_idx), val=full.subset(val_idx), test=full.subset(test_idx),
        encoder={"name": "mlp", "in_features": len(FEATURES), "hidden": [128, 64]},
        description="Yeast genes: 14 functional classes (binary each) from 103 expression features",
    )
