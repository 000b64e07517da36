"""torch.utils.data Datasets and DataLoaders as polytask data: map-style, streams, user loaders,
per-task data, workers with augmentation, exact resume, and the errors a user meets."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

import polytask as pt
from polytask.core.errors import DataError, InvalidParameterError
from polytask.data.dataset import MultiOutputDataset
from polytask.data.torch_data import TorchData
from polytask.train.callbacks import CSVLogger
from sections import interrupting

N, D = 96, 6


def tensors(seed: int = 0, n: int = N) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    return x, {"reg": x[:, 0] * 2 + 0.1 * torch.randn(n, generator=g), "cls": (x[:, 1] > 0).long() + (x[:, 2] > 1).long()}


TASKS = [pt.Task("reg", "regression"), pt.Task("cls", "multiclass", num_classes=3)]


class Pairs(Dataset):
    """Items as (x, {task: y}); optional noise augmentation drawn from torch's RNG (per worker)."""

    def __init__(self, seed: int = 0, augment: bool = False, n: int = N) -> None:
        self.x, self.y = tensors(seed, n)
        self.augment = augment

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i] + (0.05 * torch.randn(D) if self.augment else 0)
        return x, {t: v[i] for t, v in self.y.items()}


class Records(Pairs):
    """Items as mappings {'x': …, TASK: …, 'masks': …}: every third row has no regression label."""

    def __getitem__(self, i: int):
        return {"x": self.x[i], "reg": self.y["reg"][i], "cls": self.y["cls"][i], "masks": {"reg": torch.tensor(i % 3 != 0)}}


class Stream(IterableDataset):
    def __init__(self, n: int = N, sized: bool = False) -> None:
        self.x, self.y = tensors(0, n)
        self.sized = sized

    def __iter__(self):
        for i in range(len(self.x)):
            yield self.x[i], {t: v[i] for t, v in self.y.items()}


class SizedStream(Stream):
    def __len__(self) -> int:
        return len(self.x)


def trainer(epochs: int = 2, **kwargs) -> pt.Trainer:
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=D, hidden=[16]), TASKS)
    loop = {"epochs": epochs, "batch_size": 16, **kwargs.pop("loop", {})}
    return pt.Trainer(model, TASKS, loop=loop, optim={"lr": 0.05}, run={"progress": False}, **kwargs)


def losses(run: pt.Trainer) -> list[tuple[int, str, float]]:
    return [(s["step"], s["task"], s["loss"]) for s in run.callback(CSVLogger).steps]


def test_map_style_dataset_trains_exactly_like_the_same_rows_in_memory():
    x, y = tensors()
    in_memory = trainer()
    in_memory.fit(MultiOutputDataset(x, y))
    wrapped = trainer()
    report = wrapped.fit(Pairs())  # a plain torch Dataset, wrapped on the way in
    assert losses(wrapped) == losses(in_memory)  # same order, same batches, bit for bit
    assert report.metrics["reg"]["rmse"] == in_memory.evaluate(MultiOutputDataset(x, y))["reg"]["rmse"]
    assert wrapped.evaluate(Pairs())["cls"]["accuracy"] == report.metrics["cls"]["accuracy"]


def test_workers_and_random_augmentation_are_reproducible():
    first, second, serial = trainer(), trainer(), trainer()
    first.fit(TorchData(Pairs(augment=True), num_workers=2))
    second.fit(TorchData(Pairs(augment=True), num_workers=2))
    serial.fit(Pairs(augment=False))
    assert losses(first) == losses(second)  # worker seeds come from the run's data generator
    assert losses(first) != losses(serial)  # the augmentation did happen
    assert [s[:2] for s in losses(first)] == [s[:2] for s in losses(serial)]


def test_mapping_items_with_masks_and_a_users_dataloader():
    run = trainer()
    run.fit(Records())
    assert run.step_index == 2 * 6
    loader = DataLoader(Records(), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(3))
    own = trainer()
    own.fit(loader)  # the loader's own batch size: 3 steps per epoch
    assert own.step_index == 2 * 3
    with pytest.raises(InvalidParameterError, match="DataLoader brings its own num_workers"):
        TorchData(loader, num_workers=2)


def test_a_stream_needs_steps_per_epoch_and_then_trains():
    with pytest.raises(DataError, match="steps_per_epoch"):
        trainer().fit(Stream())
    run = trainer(loop={"steps_per_epoch": 4})
    run.fit(Stream(), val=SizedStream())
    assert run.step_index == 8
    sized = trainer()
    sized.fit(SizedStream())  # a stream with __len__ has a natural epoch
    assert sized.step_index == 2 * 6


def test_per_task_torch_data_sets():
    a, b = Pairs(0, n=64), Pairs(1, n=32)

    class Only(Dataset):
        def __init__(self, base: Pairs, task: str) -> None:
            self.base, self.task = base, task

        def __len__(self) -> int:
            return len(self.base)

        def __getitem__(self, i: int):
            x, y = self.base[i]
            return x, {self.task: y[self.task]}

    run = trainer(loop={"loader_mode": "sample"})
    run.fit({"reg": Only(a, "reg"), "cls": Only(b, "cls")})
    tasks = [r["task"] for r in run.callback(CSVLogger).steps]
    assert run.step_index == 2 * (4 + 2) and set(tasks) == {"reg", "cls"}


def test_mid_epoch_resume_with_a_dataset_is_exact(tmp_path):
    straight = trainer()
    straight.fit(TorchData(Pairs(augment=True), num_workers=1))
    with pytest.raises(KeyboardInterrupt):
        trainer(method=interrupting(8), output_dir=tmp_path / "r", loop={"checkpoint_every": 3}).fit(
            TorchData(Pairs(augment=True), num_workers=1))
    resumed = trainer(output_dir=tmp_path / "r", resume=True)
    resumed.fit(TorchData(Pairs(augment=True), num_workers=1))
    assert losses(resumed) == losses(straight)


class Broken(Pairs):
    def __init__(self, item) -> None:
        super().__init__()
        self.item = item

    def __getitem__(self, i: int):
        return self.item(self, i)


@pytest.mark.parametrize(("item", "message"), [
    (lambda self, i: self.x[i], r"is Tensor; expected \(x, targets\)"),
    (lambda self, i: (self.x[i], self.y["reg"][i]), "expected a mapping task name"),
    (lambda self, i: {"input": self.x[i]}, "without an 'x' entry"),
    (lambda self, i: (self.x[i], {"reg": self.y["reg"][i]}), r"no targets for task\(s\) \['cls'\]"),
    (lambda self, i: (self.x[i].tolist(), {"reg": self.y["reg"][i], "cls": self.y["cls"][i]}), "expected a torch.Tensor"),
    (lambda self, i: ((self.x[i] * 100).to(torch.uint8), {"reg": self.y["reg"][i], "cls": self.y["cls"][i]}),
     "dtype torch.uint8"),
    (lambda self, i: (self.x[i], {"reg": self.y["reg"][i], "cls": self.y["cls"][i], "age": 3}), r"\['age'\]"),
])
def test_malformed_items_are_one_clear_error(item, message):
    with pytest.raises(DataError, match=message):
        trainer().fit(Broken(item))


def test_a_bad_label_deep_in_the_data_names_the_batch_and_row():
    data = Pairs()
    data.y["cls"][70] = 7  # batch 4 of the in-order evaluation pass, row 6 in it
    run = trainer(epochs=1)
    with pytest.raises(DataError, match=r"batch \d+.*7") as caught:
        run.fit(data)
    assert "task 'cls'" in str(caught.value) and "[0, 2]" in str(caught.value)  # the task and the valid range


def test_empty_and_non_torch_data_are_refused():
    with pytest.raises(DataError, match="no rows"):
        trainer().fit(Pairs(n=0))
    with pytest.raises(DataError, match="must be a MultiOutputDataset, TaskDatasets, a torch.utils.data Dataset"):
        trainer().fit([1, 2, 3])
    with pytest.raises(DataError, match="TorchData takes a torch.utils.data Dataset"):
        TorchData([1, 2, 3])  # type: ignore[arg-type]
