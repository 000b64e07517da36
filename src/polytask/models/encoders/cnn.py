"""Small convolutional encoder for images."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.models.encoders.base import ENCODERS


@ENCODERS.register("cnn")
class CNN(nn.Module):
    """Conv(3×3) → BatchNorm → ReLU → MaxPool blocks, global average pooling, a linear layer.

    Global pooling makes the output width independent of the image size, so tasks whose images
    differ in size can share it.
    """

    def __init__(self, *, in_channels: int = 1, channels: Sequence[int] = (32, 64), out_features: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or in_channels < 1:
            raise InvalidParameterError(f"`in_channels` of `cnn` must be a positive int; found {in_channels!r}")
        if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
            raise InvalidParameterError(f"`channels` of `cnn` must be positive ints; found {list(channels)}")
        blocks: list[nn.Module] = []
        width = in_channels
        for c in channels:
            blocks += [nn.Conv2d(width, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.MaxPool2d(2)]
            width = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Sequential(nn.Linear(width, out_features), nn.ReLU(), nn.Dropout(dropout))
        self.in_channels = in_channels
        self.out_features = out_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:  # (B, H, W) grayscale
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"`cnn` expects images (batch, {self.in_channels}, H, W); found {tuple(x.shape)}")
        return self.proj(self.pool(self.features(x)).flatten(1))
