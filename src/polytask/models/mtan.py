"""Multi-Task Attention Network (MTAN) on the ``cnn`` encoder."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.core.task import Task
from polytask.models._common import task_heads
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.encoders.cnn import CNN


def _attention(in_channels: int, channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(),
                         nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels), nn.Sigmoid())


@ARCHITECTURES.register("mtan")
class MTAN(MultiTaskModel):
    """Per-task soft attention masks over the blocks of one shared CNN.

    Multi-Task Attention Network (Liu, Johns & Davison, "End-to-End Multi-Task Learning with
    Attention", CVPR 2019).

    A shared ``cnn`` (the global feature pool) plus, per task and per conv block j, a soft
    attention mask aₜʲ = σ(BN(conv₁ₓ₁(ReLU(BN(conv₁ₓ₁([uʲ, âₜʲ⁻¹])))))) applied element-wise to the
    shared block's features uʲ (before pooling): âₜʲ = pool(aₜʲ ⊙ uʲ). The task's last attended
    map goes through the encoder's global pooling and projection, then its head. (The paper's
    extra shared 3×3 convolution after each mask is left out: the next shared block plays it.)

    θ: the whole shared CNN. Private to task t: its attention modules and head. z: the projected
    task features stacked as (batch, T, D), task order = ``task_names``.
    """

    shares_representation = False  # each task reads its own slice of z

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], *, head_hidden: Sequence[int] = (),
                 head_dropout: float = 0.0) -> None:
        super().__init__(tasks)
        if not isinstance(encoder, CNN):
            raise InvalidParameterError(
                f"`mtan` attends over the blocks of the `cnn` encoder; found {type(encoder).__name__} "
                "(use encoder: {name: cnn, ...})")
        self.encoder = encoder
        widths = encoder.channels
        self.attention = nn.ModuleDict({
            t.name: nn.ModuleList(_attention(c + (widths[j - 1] if j else 0), c) for j, c in enumerate(widths))
            for t in tasks})
        self.representation_dim = encoder.out_features
        self.heads = task_heads(tasks, encoder.out_features, head_hidden, head_dropout,
                                feature_map=getattr(encoder, "feature_map", None))

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        enc = self.encoder
        if x.dim() == 3:
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != enc.in_channels:
            raise ShapeError(f"`mtan` expects images (batch, {enc.in_channels}, H, W); found {tuple(x.shape)}")
        attended: dict[str, Tensor | None] = dict.fromkeys(self.task_names)
        h = x
        for j, (block, pool) in enumerate(enc.blocks()):
            u = block(h)
            h = pool(u)
            for t in self.task_names:
                prev = attended[t]
                mask = self.attention[t][j](u if prev is None else torch.cat([u, prev], dim=1))
                attended[t] = pool(mask * u)
        return torch.stack([enc.proj(enc.pool(attended[t]).flatten(1)) for t in self.task_names], dim=1)  # type: ignore[arg-type]

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        return {t: self.tasks[t].prepare_prediction(self.heads[t](z[:, self.task_names.index(t)])) for t in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.encoder.parameters() if p.requires_grad)

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.attention[name].parameters()
        yield from self.heads[name].parameters()
