"""Bundled real data sets that load offline from installed packages: ``load(name)``."""

from __future__ import annotations

from typing import Any

import polytask.datasets.multimnist_boxes  # noqa: F401  (registers the loader)
from polytask.datasets import adult, clothing_explain, diamonds, movielens, multimnist, qm9, reviews, yeast  # noqa: F401  (register the loaders)
from polytask.datasets.base import DATASETS, LoadedData, PackagedFile, split_by_task
from polytask.datasets.download import fetch, sha256


def load(name: str, /, **options: Any) -> LoadedData:
    """Load a bundled data set by name (``polytask list datasets``)."""
    return DATASETS.create(name, **options)


__all__ = ["DATASETS", "LoadedData", "PackagedFile", "fetch", "load", "sha256", "split_by_task"]
