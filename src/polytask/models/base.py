"""What every multi-task architecture exposes to the engine and the trainer."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import ClassVar

from torch import Tensor, nn

from polytask.core.registry import Registry
from polytask.core.task import Task, task_names
from polytask.models.spec import RecordingRegistry


class MultiTaskModel(nn.Module):
    """Base of all architectures.

    ``encode(x, task)`` gives the shared representation z (what the engine's ``features`` mode
    differentiates), ``decode(z, tasks)`` the raw outputs per task; ``forward`` chains them.
    ``shared_parameters`` (θ) and ``task_parameters(name)`` partition the trainable parameters.
    """

    #: False when ``encode`` gives each task its own slice (z of shape (batch, T, D): experts'
    #: gate mixtures, per-task columns, attention masks): the gradients w.r.t. z then never
    #: meet, so ``compare="features"`` would see no conflict and is refused
    shares_representation: ClassVar[bool] = True

    def __init__(self, tasks: Sequence[Task]) -> None:
        super().__init__()
        self.task_names = task_names(tuple(tasks))
        self.tasks = {t.name: t for t in tasks}

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None, task: str | None = None) -> dict[str, Tensor]:
        return self.decode(self.encode(x, task), tasks)

    def shared_parameters(self) -> Iterator[nn.Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the last shared module that owns any (e.g. the encoder's last layer)."""
        owners = [m for m in self.modules_shared() if any(True for _ in m.parameters(recurse=False))]
        if not owners:
            return []
        return [p for p in owners[-1].parameters(recurse=False) if p.requires_grad]

    def modules_shared(self) -> list[nn.Module]:
        """Shared modules in registration order (defaults to the ``encoder`` attribute)."""
        encoder = getattr(self, "encoder", None)
        return list(encoder.modules()) if isinstance(encoder, nn.Module) else []

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_loss(self) -> Tensor | None:
        """A regulariser added to the total loss (soft sharing's parameter distance)."""
        return None


ARCHITECTURES: Registry[MultiTaskModel] = RecordingRegistry("architecture")
