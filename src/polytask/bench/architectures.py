"""`polytask bench architectures`: parameter counts and ms per training step (equal weighting) of
every registered architecture on one fixed synthetic problem."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from polytask.bench.speed import time_step
from polytask.core.task import Task
from polytask.engine.backward import Engine
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.encoders import CNN, MLP

IMAGE = (1, 16, 16)


def build(name: str, tasks: list[Task]) -> tuple[MultiTaskModel, str]:
    """The architecture on the benchmark's encoder: an MLP (256 → 128 → 64) on the flattened
    image, or for ``mtan`` (conv only) a CNN with blocks (16, 32) and 64 outputs."""
    cls = ARCHITECTURES.get(name)
    if name == "mtan":
        return cls(CNN(in_channels=1, channels=[16, 32], out_features=64), tasks), "cnn[16,32]→64"
    factory: Callable[[], nn.Module] = lambda: MLP(in_features=256, hidden=[128, 64])  # noqa: E731
    if "encoder_factory" in ARCHITECTURES.parameters(name):
        return cls(factory, tasks), "mlp 256→128→64 (per copy)"
    return cls(factory(), tasks), "mlp 256→128→64"


@dataclass
class Row:
    architecture: str
    encoder: str
    tasks: int
    params: int
    shared_params: int
    ms: float


HEADER = f"{'architecture':<14} {'T':>3} {'params':>10} {'shared':>10} {'ms/step':>9}  encoder"


def format_row(row: Row) -> str:
    return f"{row.architecture:<14} {row.tasks:>3} {row.params:>10,} {row.shared_params:>10,} {row.ms:>9.2f}  {row.encoder}"


def measure(name: str, n_tasks: int, *, batch_size: int = 256, steps: int = 20, warmup: int = 3,
            device: str = "cpu", seed: int = 0) -> Row:
    """One architecture: sizes, then the median time of a full step (forward, per-task MSE,
    equal-weight backward through the engine with the model's extra loss, Adam update)."""
    torch.manual_seed(seed)
    dev = torch.device(device)
    kind = "binary" if name == "esmm" else "regression"
    tasks = [Task(f"task{i}", kind=kind) for i in range(n_tasks)]
    model, encoder = build(name, tasks)
    model.to(dev).train()
    x = torch.randn(batch_size, *IMAGE, device=dev)
    y = torch.rand(batch_size, n_tasks, device=dev).round()
    engine = Engine("equal", model.shared_parameters())
    engine.method.setup([t.name for t in tasks])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss_of(out: dict[str, Tensor], i: int, task: Task) -> Tensor:
        return task.loss(out[task.name], y[:, i])

    def step(i: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        z = model.encode(x)
        out = model.decode(z)
        losses = {t.name: loss_of(out, j, t) for j, t in enumerate(tasks)}
        engine.backward(losses, features=[z], extra_loss=model.extra_loss())
        optimizer.step()

    ms, _ = time_step(step, dev, steps, warmup)
    params = sum(p.numel() for p in model.parameters())
    shared = sum(p.numel() for p in model.shared_parameters())
    return Row(name, encoder, n_tasks, params, shared, ms)


def run(task_counts: Sequence[int], architectures: Sequence[str] | None = None, *, batch_size: int = 256,
        steps: int = 20, warmup: int = 3, device: str = "cpu", echo: Callable[[str], None] = print) -> list[Row]:
    names = list(architectures) if architectures else ARCHITECTURES.names()
    for name in names:
        ARCHITECTURES.get(name)
    echo(f"synthetic problem: batch {batch_size} of {IMAGE} images, equal weighting, Adam; median of {steps} steps")
    echo(HEADER)
    rows = []
    for n_tasks in task_counts:
        for name in names:
            rows.append(measure(name, n_tasks, batch_size=batch_size, steps=steps, warmup=warmup, device=device))
            echo(format_row(rows[-1]))
    return rows
