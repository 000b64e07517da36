"""Batches, in-memory data sets for both regimes, and task samplers."""

from polytask.data.dataset import Batch, MultiOutputDataset, TaskDatasets
from polytask.data.samplers import SAMPLERS, Sampler

__all__ = ["SAMPLERS", "Batch", "MultiOutputDataset", "Sampler", "TaskDatasets"]
