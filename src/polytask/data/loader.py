"""How an epoch walks multi-task data: the batches of each step."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from polytask.core.errors import InvalidParameterError, closest
from polytask.data.dataset import Batch, MultiOutputDataset, TaskDatasets
from polytask.data.samplers.base import Sampler

#: ``sample``: one task per step, drawn by the sampler; an epoch has as many steps as all task
#: data sets have batches together.
LOADER_MODES = ("sample",)


def steps_in_epoch(data: MultiOutputDataset | TaskDatasets, batch_size: int, mode: str = "sample",
                   steps_per_epoch: int | None = None) -> int:
    check_mode(mode)
    if steps_per_epoch is not None:
        return steps_per_epoch
    if isinstance(data, MultiOutputDataset):
        return math.ceil(len(data) / batch_size)
    return sum(math.ceil(n / batch_size) for n in data.sizes.values())


def epoch_batches(data: MultiOutputDataset | TaskDatasets, batch_size: int, *, generator: torch.Generator,
                  sampler: Sampler, sampler_generator: torch.Generator, step: int, total_steps: int,
                  mode: str = "sample", steps_per_epoch: int | None = None) -> Iterator[list[Batch]]:
    """Yield each step's batches (one per data set the step draws from)."""
    steps = steps_in_epoch(data, batch_size, mode, steps_per_epoch)
    if isinstance(data, MultiOutputDataset):
        stream = cycle(data, batch_size, generator, None)
        for _ in range(steps):
            yield [next(stream)]
        return
    streams = {t: cycle(ds, batch_size, generator, t) for t, ds in data.datasets.items()}
    for i in range(steps):
        task = sampler.sample(sampler_generator, step + i, total_steps)
        yield [next(streams[task])]


def cycle(data: MultiOutputDataset, batch_size: int, generator: torch.Generator, source: str | None) -> Iterator[Batch]:
    """Endless shuffled batches (re-shuffled at every pass)."""
    while True:
        yield from data.batches(batch_size, shuffle=True, generator=generator, source=source)


def check_mode(mode: str) -> None:
    if mode not in LOADER_MODES:
        raise InvalidParameterError(f"unknown loader mode '{mode}'.{closest(mode, LOADER_MODES)} Valid: {', '.join(LOADER_MODES)}")
