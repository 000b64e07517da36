"""Batches, in-memory data sets for both regimes, torch Datasets/DataLoaders as data, and task samplers."""

from polytask.data.dataset import Batch, MultiOutputDataset, TaskDatasets
from polytask.data.samplers import SAMPLERS, Sampler
from polytask.data.torch_data import TorchData

__all__ = ["SAMPLERS", "Batch", "MultiOutputDataset", "Sampler", "TaskDatasets", "TorchData"]
