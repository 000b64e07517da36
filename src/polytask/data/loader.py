"""How an epoch walks multi-task data: the batches of each step."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from polytask.core.errors import DataError, InvalidParameterError, closest
from polytask.data.dataset import Batch, MultiOutputDataset, TaskDatasets
from polytask.data.samplers.base import Sampler
from polytask.data.torch_data import TorchData

#: How an epoch walks per-task data sets (the last three are the modes of Lightning's CombinedLoader):
#:
#: - ``sample``: one task per step, drawn by the sampler; an epoch has as many steps as all task
#:   data sets have batches together (Σᵢ ⌈nᵢ/b⌉).
#: - ``max_size_cycle``: every step holds one batch of every task; the epoch ends when the largest
#:   data set has been seen once (maxᵢ ⌈nᵢ/b⌉ steps); smaller ones cycle, re-shuffled at each pass.
#: - ``min_size``: every step holds one batch of every task; the epoch ends with the smallest data
#:   set (minᵢ ⌈nᵢ/b⌉ steps), so larger ones are only partly seen (a fresh shuffle every epoch).
#: - ``sequential``: all batches of the first task, then all of the second, … (Σᵢ ⌈nᵢ/b⌉ steps).
#:
#: ``steps_per_epoch`` overrides the count in every mode ("N steps per epoch"): the walk is cut
#: short or continues (data sets cycle). The sampler is used in ``sample`` mode only. A multi-output
#: data set (one input, all targets) is walked the same way in every mode. Everything an epoch
#: yields follows from the data generator's state at its start, the sampler generator and the
#: sampler's state: no iterator state is hidden here.
LOADER_MODES = ("sample", "max_size_cycle", "min_size", "sequential")


#: one data set for all tasks (the multi-output regime): in memory, or a torch Dataset/DataLoader
Single = MultiOutputDataset | TorchData


def steps_in_epoch(data: Single | TaskDatasets, batch_size: int, mode: str = "sample",
                   steps_per_epoch: int | None = None) -> int:
    """Steps of one epoch for ``mode`` (see :data:`LOADER_MODES`), or ``steps_per_epoch`` when given."""
    check_mode(mode)
    if steps_per_epoch is not None:
        if isinstance(steps_per_epoch, bool) or not isinstance(steps_per_epoch, int) or steps_per_epoch < 1:
            raise InvalidParameterError(f"`steps_per_epoch` must be an int >= 1 or None; found {steps_per_epoch!r}")
        return steps_per_epoch
    if isinstance(data, (MultiOutputDataset, TorchData)):
        return data.num_batches(batch_size)
    counts = [ds.num_batches(batch_size) for ds in data.datasets.values()]
    if mode == "max_size_cycle":
        return max(counts)
    if mode == "min_size":
        return min(counts)
    return sum(counts)


def epoch_batches(data: Single | TaskDatasets, batch_size: int, *, generator: torch.Generator,
                  sampler: Sampler, sampler_generator: torch.Generator, step: int, total_steps: int,
                  mode: str = "sample", steps_per_epoch: int | None = None) -> Iterator[list[Batch]]:
    """Yield each step's batches: one per data set the step draws from (one per task in
    ``max_size_cycle`` and ``min_size`` modes, one in ``sample`` and ``sequential`` modes)."""
    steps = steps_in_epoch(data, batch_size, mode, steps_per_epoch)
    if isinstance(data, (MultiOutputDataset, TorchData)):
        stream = cycle(data, batch_size, generator, None)
        for _ in range(steps):
            yield [next(stream)]
        return
    streams = {t: cycle(ds, batch_size, generator, t) for t, ds in data.datasets.items()}
    if mode in ("max_size_cycle", "min_size"):
        for _ in range(steps):
            yield [next(stream) for stream in streams.values()]
    elif mode == "sequential":
        order = _sequential_order(data, batch_size)
        for _ in range(steps):
            yield [next(streams[next(order)])]
    else:
        for i in range(steps):
            task = sampler.sample(sampler_generator, step + i, total_steps)
            yield [next(streams[task])]


def _sequential_order(data: TaskDatasets, batch_size: int) -> Iterator[str]:
    """Task after task, ⌈nᵢ/b⌉ steps each (one full pass of its data set), then around again."""
    while True:
        for task, ds in data.datasets.items():
            for _ in range(ds.num_batches(batch_size)):
                yield task


def cycle(data: Single, batch_size: int, generator: torch.Generator, source: str | None) -> Iterator[Batch]:
    """Endless shuffled batches (re-shuffled at every pass; a stream is read again from its start)."""
    while True:
        empty = True
        for batch in data.batches(batch_size, shuffle=True, generator=generator, source=source):
            empty = False
            yield batch
        if empty:
            whose = f" of task '{source}'" if source else ""
            raise DataError(f"the training data{whose} yielded no batch in a whole pass; expected at least one sample "
                            "per pass (a stream must start again when iterated anew)")


def check_mode(mode: str) -> None:
    if mode not in LOADER_MODES:
        raise InvalidParameterError(f"unknown loader mode '{mode}'.{closest(mode, LOADER_MODES)} Valid: {', '.join(LOADER_MODES)}")
