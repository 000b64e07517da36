"""Cross-stitch networks: one column per task, mixed by learned linear units between stages."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.core.task import Task
from polytask.models._common import EncoderFactory, last_layer, make_encoder, task_heads, trainable
from polytask.models.base import ARCHITECTURES, MultiTaskModel


def encoder_stages(module: nn.Module) -> list[nn.Module]:
    """The encoder cut into stages: its ``stages()`` when it has one, else the whole module."""
    stages = getattr(module, "stages", None)
    return list(stages()) if callable(stages) else [module]


@ARCHITECTURES.register("cross_stitch")
class CrossStitch(MultiTaskModel):
    """One column per task, mixed after every stage by learned cross-stitch units.

    Cross-stitch networks (Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for
    Multi-task Learning", CVPR 2016).

    One column (a fresh encoder) per task. After every stage l of the columns (``stages()`` of
    the encoder: each hidden layer of ``mlp``, each conv block and the projection of ``cnn``; a
    user module without ``stages()`` is one stage), a cross-stitch unit mixes them:
    x̃ᵢˡ = Σⱼ αᵢⱼˡ xⱼˡ, α initialised to ``self_weight`` on the diagonal and
    (1 − ``self_weight``)/(T − 1) elsewhere (the paper's (0.9, 0.1) for two tasks).

    θ: every column and every α — through α each column reaches every task's loss. z: the
    final mixed column outputs stacked as (batch, T, D), task order = ``task_names``.
    """

    shares_representation = False  # each task reads its own slice of z

    def __init__(self, encoder_factory: EncoderFactory, tasks: Sequence[Task], *, self_weight: float = 0.9,
                 head_hidden: Sequence[int] = (), head_dropout: float = 0.0) -> None:
        super().__init__(tasks)
        if not isinstance(self_weight, (int, float)) or not 0 <= self_weight <= 1:
            raise InvalidParameterError(f"`self_weight` of `cross_stitch` must be in [0, 1]; found {self_weight!r}")
        columns, widths = zip(*(make_encoder(encoder_factory, "cross_stitch", "column") for _ in tasks), strict=True)
        self.columns = nn.ModuleList(columns)
        self._stages = [encoder_stages(c) for c in columns]
        n_tasks, n_stages = len(columns), len(self._stages[0])
        off = (1.0 - self_weight) / (n_tasks - 1) if n_tasks > 1 else 0.0
        init = torch.full((n_tasks, n_tasks), off) + torch.eye(n_tasks) * ((1.0 if n_tasks == 1 else self_weight) - off)
        self.alphas = nn.ParameterList([nn.Parameter(init.clone()) for _ in range(n_stages)])
        self.representation_dim = widths[0]
        self.heads = task_heads(tasks, widths[0], head_hidden, head_dropout)

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        xs = [x] * len(self.columns)
        for level, alpha in enumerate(self.alphas):
            outs = [stages[level](xi) for stages, xi in zip(self._stages, xs, strict=True)]
            stacked = torch.stack(outs, dim=1)  # (B, T, ...)
            mixed = torch.einsum("ij,bj...->bi...", alpha, stacked)
            xs = list(mixed.unbind(1))
        z = torch.stack(xs, dim=1)
        if z.dim() != 3 or z.shape[2] != self.representation_dim:
            raise ShapeError(f"cross_stitch columns returned {tuple(z.shape[:1] + z.shape[2:])} per task; "
                             f"expected (batch, {self.representation_dim})")
        return z

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        return {t: self.tasks[t].prepare_prediction(self.heads[t](z[:, self.task_names.index(t)])) for t in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(trainable([*self.columns.parameters(), *self.alphas]))

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.columns for p in last_layer(c)] + trainable([self.alphas[-1]])

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.heads[name].parameters()
