"""Small convolutional encoder for images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.models.encoders.base import ENCODERS
from polytask.models.heads import layer_sizes


@ENCODERS.register("cnn")
class CNN(nn.Module):
    """Conv(3×3) → BatchNorm → ReLU → MaxPool blocks, adaptive average pooling, a linear layer.

    Adaptive pooling to a ``pool`` × ``pool`` grid makes the output width independent of the image
    size (tasks whose images differ in size can share it); ``pool`` > 1 keeps where things are in
    the image, which tasks such as MultiMNIST's left/right digit need.
    """

    def __init__(self, *, in_channels: int = 1, channels: Sequence[int] = (32, 64), out_features: int = 128,
                 dropout: float = 0.0, pool: int = 1) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise InvalidParameterError(f"`in_channels` of `cnn` must be a positive int; found {in_channels!r}")
        channels = layer_sizes(channels, "channels", "cnn", allow_empty=False)
        blocks: list[nn.Module] = []
        width = in_channels
        for c in channels:
            blocks += [nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*blocks)
        if not isinstance(pool, int) or pool < 1:
            raise InvalidParameterError(f"`pool` of `cnn` must be a positive int; found {pool!r}")
        self.pool = nn.AdaptiveAvgPool2d(pool)
        self.proj = nn.Sequential(nn.Linear(width * pool * pool, out_features), nn.ReLU(), nn.Dropout(dropout))
        self.in_channels = in_channels
        self.channels = [int(c) for c in channels]
        self.out_features = out_features

    def blocks(self) -> list[tuple[nn.Sequential, nn.Module]]:
        """Each block as (conv → BN → ReLU, its max-pool), sharing this encoder's modules."""
        return [(self.features[4 * i:4 * i + 3], self.features[4 * i + 3]) for i in range(len(self.channels))]

    def stages(self) -> list[nn.Module]:
        """The encoder cut between blocks (cross-stitch units go between stages)."""
        tail = nn.Sequential(self.pool, nn.Flatten(1), self.proj)
        return [self.features[4 * i:4 * i + 4] for i in range(len(self.channels))] + [tail]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(self.features(self._check(x))).flatten(1))

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # (B, H, W) grayscale
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"`cnn` expects images (batch, {self.in_channels}, H, W); found {tuple(x.shape)}")
        return x
