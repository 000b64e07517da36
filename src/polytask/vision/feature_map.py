"""What an encoder that keeps the spatial layout of its features exposes to per-pixel and detection heads."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from polytask.core.errors import ShapeError


@dataclass(frozen=True)
class FeatureMap:
    """The shape of an encoder's feature map, carried as a flat representation z (batch, C·h·w).

    Architectures pass z around as (batch, D) rows (what the engine's ``features`` mode
    differentiates); a head of a vision task unflattens it back to (batch, C, h, w).
    ``stride``: input pixels per feature-map cell (2^blocks for the ``cnn_map`` encoder).
    """

    channels: int
    height: int
    width: int
    stride: int

    @property
    def size(self) -> int:
        return self.channels * self.height * self.width

    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the input the map covers."""
        return self.height * self.stride, self.width * self.stride

    def unflatten(self, z: Tensor, who: str = "head") -> Tensor:
        if z.dim() == 4 and tuple(z.shape[1:]) == (self.channels, self.height, self.width):
            return z
        if z.dim() != 2 or z.shape[1] != self.size:
            raise ShapeError(f"{who} expects the flattened feature map (batch, {self.channels}·{self.height}·{self.width} = "
                             f"{self.size}); found {tuple(z.shape)}")
        return z.view(len(z), self.channels, self.height, self.width)
