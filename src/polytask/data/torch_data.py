"""Data the way PyTorch users hold it: any ``torch.utils.data`` Dataset or DataLoader as polytask data.

:class:`TorchData` wraps

* a **map-style** ``Dataset`` (``__getitem__`` + ``__len__``): polytask builds the DataLoader —
  ``num_workers``, ``pin_memory``, ``collate_fn`` as given — and draws each pass's order from the
  trainer's data generator, so runs are reproducible and resume exactly mid-epoch (with workers
  too: each pass's worker seeds come from the same generator);
* an **iterable** ``IterableDataset`` (streaming): batched in the order it yields; an epoch is
  ``loop.steps_per_epoch`` steps when it has no ``__len__``;
* a user's **DataLoader**: used as it is (its batch size, sampler, workers and collate function);
  polytask only converts its batches.

Each item (or collated batch) is ``(x, targets)``, ``(x, targets, masks)`` or a mapping with the
input under ``"x"`` and the task targets under their task names (optionally ``"masks"``: task →
bool, True where the label is known). Transforms and augmentation stay in the user's Dataset.
Every batch is checked like in-memory data (target shapes, label ranges, finite inputs), and an
error names the split, the batch and the row in it.

Several tasks with their own data (the multi-input regime) take a mapping task → data:
``TaskDatasets({"a": TorchData(ds_a), "b": TorchData(ds_b)})``, or simply ``{"a": ds_a, "b": ds_b}``
given to :meth:`polytask.Trainer.fit`.

Departures
----------
Resuming mid-epoch replays the epoch's batches up to the checkpoint (they are read and dropped,
not trained on): exact for map-style data; for a user's DataLoader or a stream, exact when they
yield the same batches again (a DataLoader with a seeded ``generator``, a deterministic stream).
Target standardisation (``Task.target_scaling``) is not fitted on such data: the rows are not in
memory; fit it on a sample with :func:`polytask.standardize_targets` if targets are large.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from polytask.core.errors import DataError, InvalidParameterError
from polytask.core.task import Task
from polytask.data.dataset import Batch, MultiOutputDataset


def _seed_of(generator: torch.Generator) -> int:
    """A 63-bit seed that is a function of the generator's state (nothing is drawn from it)."""
    import hashlib

    digest = hashlib.blake2b(generator.get_state().numpy().tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _PassBatches:
    """A batch sampler whose every pass is a fresh permutation drawn from a shared generator (or
    the rows in order). The draw happens when a pass starts, in the main process."""

    def __init__(self, n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None) -> None:
        self.n, self.batch_size, self.shuffle, self.generator = n, batch_size, shuffle, generator

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for start in range(0, self.n, self.batch_size):
            yield order[start:start + self.batch_size].tolist()


class TorchData:
    """A ``torch.utils.data`` Dataset or DataLoader as polytask data (see the module docstring).

    Args:
        data: a map-style ``Dataset``, an ``IterableDataset`` or a ``DataLoader``.
        num_workers, pin_memory, collate_fn, prefetch_factor: passed to the DataLoader polytask
            builds for a Dataset (not allowed with a DataLoader, which has its own).
        name: how errors refer to this data (default: the class name of ``data``).
    """

    def __init__(self, data: Dataset | DataLoader, *, num_workers: int = 0, pin_memory: bool = False,
                 collate_fn: Callable[[list[Any]], Any] | None = None, prefetch_factor: int | None = None,
                 name: str | None = None) -> None:
        if isinstance(data, (MultiOutputDataset, TorchData)):
            raise InvalidParameterError(f"{type(data).__name__} is polytask data already; pass it as it is")
        if not isinstance(data, (Dataset, DataLoader)):
            raise DataError(f"TorchData takes a torch.utils.data Dataset or DataLoader; found {type(data).__name__}")
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise InvalidParameterError(f"`num_workers` must be an int >= 0; found {num_workers!r}")
        if isinstance(data, DataLoader) and (num_workers or pin_memory or collate_fn is not None or prefetch_factor):
            raise InvalidParameterError("a DataLoader brings its own num_workers, pin_memory, collate_fn and "
                                        "prefetch_factor; set them on the DataLoader, or pass its Dataset instead")
        self.data = data
        self.name = name or type(data).__name__
        self.workers = {"num_workers": num_workers, "pin_memory": pin_memory, "collate_fn": collate_fn,
                        "prefetch_factor": prefetch_factor if num_workers else None,
                        # not persistent: workers seeded once would carry their random state across passes,
                        # which no checkpoint holds
                        "persistent_workers": False}
        self._loaders: dict[tuple[int, bool], DataLoader] = {}
        #: the tasks each batch is checked against (set by :meth:`validate`)
        self.tasks: list[Task] | None = None

    # ------------------------------------------------------------------------------ describing
    @property
    def is_loader(self) -> bool:
        return isinstance(self.data, DataLoader)

    @property
    def is_stream(self) -> bool:
        dataset = self.data.dataset if isinstance(self.data, DataLoader) else self.data
        return isinstance(dataset, IterableDataset)

    def __len__(self) -> int:
        """Rows (samples), where the data know it; a DataLoader counts its dataset's rows."""
        dataset = self.data.dataset if isinstance(self.data, DataLoader) else self.data
        try:
            return len(dataset)  # type: ignore[arg-type]
        except TypeError:
            raise DataError(f"{self.name} is a stream without __len__, so its size is unknown; expected a dataset with "
                            "__len__, or set train.steps_per_epoch (loop.steps_per_epoch) to say how long an epoch is"
                            ) from None

    def has_length(self) -> bool:
        try:
            len(self.data if isinstance(self.data, DataLoader) else self.data)  # type: ignore[arg-type]
        except TypeError:
            return False
        return True

    def num_batches(self, batch_size: int) -> int:
        """Batches in one pass: the DataLoader's own count, else ⌈rows / batch_size⌉."""
        if isinstance(self.data, DataLoader):
            try:
                return len(self.data)
            except TypeError:
                raise DataError(f"{self.name} (a DataLoader over a stream) has no length, so an epoch has no natural "
                                "end; set train.steps_per_epoch (loop.steps_per_epoch)") from None
        return math.ceil(len(self) / batch_size)

    @property
    def task_names(self) -> tuple[str, ...]:
        return tuple(self._first().targets)

    # ------------------------------------------------------------------------------- batches
    def _loader(self, batch_size: int, shuffle: bool, generator: torch.Generator | None) -> DataLoader | Any:
        if isinstance(self.data, DataLoader):
            return self.data
        key = (batch_size, shuffle)
        if key not in self._loaders:
            if isinstance(self.data, IterableDataset):
                # a stream is read in its own order; shuffling it would need a buffer the user controls
                self._loaders[key] = DataLoader(self.data, batch_size=batch_size, generator=generator, **self.workers)
            else:
                # the order comes from the run's generator, drawn as in-memory data draw it (the same batches);
                # worker seeds from a generator of the loader's own, re-seeded at each pass (see raw_batches)
                sampler = _PassBatches(len(self), batch_size, shuffle, generator)
                self._loaders[key] = DataLoader(self.data, batch_sampler=sampler, generator=torch.Generator(),
                                                **self.workers)
        return self._loaders[key]

    def raw_batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
                    ) -> Iterator[Any]:
        loader = self._loader(batch_size, shuffle, generator)
        if loader is not self.data and loader.generator is not None and not isinstance(self.data, IterableDataset):
            # Workers are started anew at every pass and seeded from this: a function of the run generator's
            # state at the pass's start, which a checkpoint restores, so augmentation in workers repeats exactly
            # after a resume; reading the state draws nothing, so the order stays that of in-memory data.
            loader.generator.manual_seed(_seed_of(generator) if shuffle and generator is not None else 0)
        return iter(loader)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                source: str | None = None, tasks: Sequence[Task] | None = None, where: str = "data") -> Iterator[Batch]:
        """One pass as :class:`Batch` es, each checked against ``tasks`` (default: those of
        :meth:`validate`)."""
        tasks = self.tasks if tasks is None else tasks
        for index, raw in enumerate(self.raw_batches(batch_size, shuffle=shuffle, generator=generator)):
            yield to_batch(raw, tasks, f"{where} ({self.name}) batch {index}", source)

    def _first(self) -> Batch:
        dataset = self.data.dataset if isinstance(self.data, DataLoader) else self.data
        if not isinstance(dataset, IterableDataset) and not isinstance(self.data, DataLoader):
            if len(self) == 0:
                raise DataError(f"{self.name} has no rows; expected at least one sample")
            collate = self.workers["collate_fn"] or torch.utils.data.default_collate
            return to_batch(collate([dataset[0]]), None, f"{self.name} item 0", None)
        for raw in self.raw_batches(1):
            return to_batch(raw, None, f"{self.name} batch 0", None)
        raise DataError(f"{self.name} yielded no batch; expected at least one sample")

    def validate(self, tasks: Sequence[Task], where: str = "data") -> None:
        """Check the first sample: it must hold targets for every task (each batch is checked as
        it is drawn). An empty data set is refused here."""
        first = self._first()
        missing = [t.name for t in tasks if t.name not in first.targets]
        if missing:
            raise DataError(f"{where} ({self.name}) has no targets for task(s) {missing}; its first sample holds "
                            f"{', '.join(first.targets) or 'none'}: expected each item as (x, {{task: target}}) or "
                            "a mapping {'x': …, TASK: target}")
        to_batch(first, tasks, f"{where} ({self.name}) item 0", None)
        self.tasks = list(tasks)


def to_batch(raw: Any, tasks: Sequence[Task] | None, where: str, source: str | None) -> Batch:
    """A collated item or batch as a :class:`Batch`; with ``tasks``, its targets checked and cast
    as :meth:`MultiOutputDataset.validate` does (the error names ``where`` and the row)."""
    if isinstance(raw, Batch):
        x, targets, masks = raw.x, dict(raw.targets), dict(raw.masks)
    elif isinstance(raw, Mapping):
        if "x" not in raw:
            raise DataError(f"{where} is a mapping without an 'x' entry (found keys {sorted(map(str, raw))}); expected "
                            "the input under 'x' and each task's target under its task name")
        x = raw["x"]
        masks = dict(raw.get("masks") or {})
        targets = dict(raw["targets"]) if "targets" in raw else {k: v for k, v in raw.items() if k not in ("x", "masks")}
    elif isinstance(raw, (tuple, list)) and len(raw) in (2, 3):
        x, targets = raw[0], raw[1]
        masks = dict(raw[2]) if len(raw) == 3 and raw[2] is not None else {}
        if not isinstance(targets, Mapping):
            raise DataError(f"{where}: the targets (second element) are a {type(targets).__name__}; expected a mapping "
                            "task name → target tensor, e.g. (x, {'income': y1, 'marital': y2})")
        targets = dict(targets)
    else:
        kind = f"a {len(raw)}-tuple" if isinstance(raw, (tuple, list)) else type(raw).__name__
        raise DataError(f"{where} is {kind}; expected (x, targets), (x, targets, masks) or a mapping "
                        "{'x': inputs, TASK: target, …} (targets and masks keyed by task name)")
    if not isinstance(x, Tensor):
        raise DataError(f"{where}: the input is a {type(x).__name__}; expected a torch.Tensor (convert in the Dataset, "
                        "e.g. torch.as_tensor(image, dtype=torch.float32) / 255)")
    targets = {k: v if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in targets.items()}
    masks = {k: v if isinstance(v, Tensor) else torch.as_tensor(v) for k, v in masks.items()}
    if tasks is None:
        return Batch(x, targets, {k: v.bool() for k, v in masks.items()}, source)
    present = [t for t in tasks if t.name in targets]
    unknown = sorted(set(targets) - {t.name for t in tasks})
    if unknown:
        raise DataError(f"{where} holds targets for {unknown}, which this data set does not train (it trains "
                        f"{', '.join(t.name for t in tasks)}); expected only those task names as target keys")
    data = MultiOutputDataset(x, targets, masks)
    data.validate(present, where=where, whole=False)
    return Batch(data.x, data.targets, data.masks, source)


def as_data(data: Any, where: str = "data") -> Any:
    """polytask data from what a user holds: polytask data as they are; a torch Dataset or
    DataLoader as :class:`TorchData`; a mapping task → any of these as :class:`TaskDatasets`."""
    from polytask.data.dataset import TaskDatasets

    if isinstance(data, (MultiOutputDataset, TaskDatasets, TorchData)) or data is None:
        return data
    if isinstance(data, (Dataset, DataLoader)):
        return TorchData(data)
    if isinstance(data, Mapping) and data and all(isinstance(k, str) for k in data):
        return TaskDatasets({k: v if isinstance(v, (MultiOutputDataset, TorchData)) else as_data(v, f"{where} of task '{k}'")
                             for k, v in data.items()})
    raise DataError(f"{where} must be a MultiOutputDataset, TaskDatasets, a torch.utils.data Dataset or DataLoader, "
                    f"or a mapping task name → one of these; found {type(data).__name__}")
