"""Shared trunk, then a branch of private layers per task before its head."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.task import Task
from polytask.models._common import check_rows, encoder_width, task_heads
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.heads import ConvBranch, mlp_layers


@ARCHITECTURES.register("task_branches")
class TaskBranches(MultiTaskModel):
    """Shared trunk, then a private branch of layers per task before its head.

    A shared trunk that branches into per-task stacks of layers (the "tree" layouts of
    Lu et al., "Fully-adaptive Feature Sharing in Multi-Task Networks", CVPR 2017, and
    Vandenhende et al., "Branched Multi-Task Networks", BMVC 2020, with the split fixed after
    the trunk).

    ŷ_t = head_t(branch_t(trunk(x))), branch_t = ``branch_depth`` blocks Linear(``branch_width``) → ReLU;
    on an encoder exposing a feature map (``cnn_map``), ``branch_depth`` blocks conv 3×3 → BN → ReLU
    that keep the map (``branch_width`` and ``branch_dropout`` are then unused).

    θ (shared parameters) is the trunk; z is the trunk output (batch, D), so the engine's
    ``features`` mode sees exactly the representation every branch reads.
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], *, branch_depth: int = 2,
                 branch_width: int | None = None, branch_dropout: float = 0.0, head_hidden: Sequence[int] = (),
                 head_dropout: float = 0.0, representation_dim: int | None = None) -> None:
        super().__init__(tasks)
        dim = encoder_width(encoder, "task_branches", representation_dim)
        if not isinstance(branch_depth, int) or branch_depth < 0:
            raise InvalidParameterError(f"`branch_depth` of `task_branches` must be an int >= 0; found {branch_depth!r}")
        width = dim if branch_width is None else branch_width
        if not isinstance(width, int) or width < 1:
            raise InvalidParameterError(f"`branch_width` of `task_branches` must be a positive int; found {branch_width!r}")
        self.encoder = encoder
        self.representation_dim = dim
        feature_map = getattr(encoder, "feature_map", None)
        if feature_map is not None:  # conv branches keep the map that per-pixel and detection heads read
            self.branches = nn.ModuleDict({t.name: ConvBranch(feature_map, branch_depth) for t in tasks})
            self.heads = task_heads(tasks, dim, head_hidden, head_dropout, feature_map=feature_map)
        else:
            self.branches = nn.ModuleDict({
                t.name: mlp_layers(dim, [width] * branch_depth, None, dropout=branch_dropout) for t in tasks})
            self.heads = task_heads(tasks, width if branch_depth else dim, head_hidden, head_dropout)

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        return check_rows(self.encoder(x), self.representation_dim, f"encoder {type(self.encoder).__name__}")

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        return {t: self.tasks[t].prepare_prediction(self.heads[t](self.branches[t](z))) for t in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.branches[name].parameters()
        yield from self.heads[name].parameters()
