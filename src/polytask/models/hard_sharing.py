"""Hard parameter sharing: one shared encoder, one head per task."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError, closest
from polytask.core.task import Task
from polytask.models._common import encoder_width
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.heads import make_head


@ARCHITECTURES.register("hard_sharing")
class HardSharing(MultiTaskModel):
    """Shared encoder + task heads (Caruana, "Multitask Learning", Machine Learning 1997).

    Args:
        encoder: any module mapping a batch to (batch, D); D is read from ``encoder.out_features``
            or given as ``representation_dim``.
        tasks: the tasks; one head each.
        heads: optional user modules per task (others get a default head).
        head_hidden: hidden sizes of default MLP heads (empty: linear heads).
        stems: optional per-task input modules run before the shared encoder, for task data sets
            whose inputs differ in shape (each stem maps its task's input to the encoder's input).
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], *, heads: Mapping[str, nn.Module] | None = None,
                 head_hidden: Sequence[int] = (), head_dropout: float = 0.0,
                 stems: Mapping[str, nn.Module] | None = None, representation_dim: int | None = None) -> None:
        super().__init__(tasks)
        dim = encoder_width(encoder, "hard_sharing", representation_dim)
        self.encoder = encoder
        self.representation_dim = dim
        for group, mapping in (("heads", heads or {}), ("stems", stems or {})):
            for name in mapping:
                if name not in self.tasks:
                    raise InvalidParameterError(
                        f"`{group}` names unknown task '{name}'.{closest(name, self.task_names)} Tasks: {', '.join(self.task_names)}")
        self.heads = nn.ModuleDict({
            t.name: (heads or {}).get(t.name) or make_head(dim, t.out_features, head_hidden, head_dropout, task=t,
                                                        feature_map=getattr(encoder, "feature_map", None))
            for t in tasks
        })
        self.stems = nn.ModuleDict(dict(stems or {}))

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        if task is not None and task in self.stems:
            x = self.stems[task](x)
        z = self.encoder(x)
        if not isinstance(z, Tensor) or z.dim() != 2 or z.shape[1] != self.representation_dim:
            shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
            who = f" (task '{task}')" if task else ""
            raise ShapeError(
                f"encoder {type(self.encoder).__name__}{who} returned {shape}; expected (batch, {self.representation_dim})")
        return z

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        return {t: self.tasks[t].prepare_prediction(self.heads[t](z)) for t in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.heads[name].parameters()
        if name in self.stems:
            yield from self.stems[name].parameters()
