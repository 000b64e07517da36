"""Per-pixel tasks: the head and the losses of ``segmentation`` and ``dense_regression`` (their
metrics are in :mod:`polytask.vision.dense_metrics`, which alone needs torchmetrics).

Targets, one map per image:

- ``segmentation``: (n, H, W) int64 class indices in [0, C), −1 where a pixel is not labelled
  (:data:`polytask.vision.IGNORE_INDEX`): those pixels count in neither the loss nor the metrics;
- ``dense_regression``: (n, H, W) float values (depth, disparity), NaN where a pixel has no
  value (e.g. occluded in a stereo pair): NaN pixels count in neither the loss nor the metrics.

An image without any map at all is a missing label of the task (its mask row is False).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.vision.feature_map import FeatureMap

IGNORE_INDEX = -1


class PixelHead(nn.Module):
    """Per-pixel head on a feature map: (batch, C·h·w) → (batch, out_channels, H, W).

    conv 3×3 → BN → ReLU on the feature map, bilinear upsampling to the task's (H, W), then
    conv 3×3 → ReLU → conv 1×1 at full resolution (a light version of the decoders of
    Long, Shelhamer & Darrell, "Fully Convolutional Networks for Semantic Segmentation", CVPR 2015,
    without skip connections: the shared encoder's intermediate maps are not part of z).

    Departures: one upsampling step and no skip connections (the head sees z only, so that every
    architecture and the engine's ``features`` mode treat it like any head).
    """

    def __init__(self, feature_map: FeatureMap, out_channels: int, output_size: tuple[int, int] | None = None, *,
                 hidden_channels: int = 32, full_resolution_channels: int = 16) -> None:
        super().__init__()
        for key, value in (("out_channels", out_channels), ("hidden_channels", hidden_channels),
                           ("full_resolution_channels", full_resolution_channels)):
            if not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"`{key}` of PixelHead must be a positive int; found {value!r}")
        self.feature_map = feature_map
        self.output_size = tuple(output_size) if output_size is not None else feature_map.image_size
        self.coarse = nn.Sequential(nn.Conv2d(feature_map.channels, hidden_channels, 3, padding=1),
                                    nn.BatchNorm2d(hidden_channels), nn.ReLU())
        self.fine = nn.Sequential(nn.Conv2d(hidden_channels, full_resolution_channels, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(full_resolution_channels, out_channels, 1))

    def forward(self, z: Tensor) -> Tensor:
        h = self.coarse(self.feature_map.unflatten(z, "per-pixel head"))
        h = F.interpolate(h, size=self.output_size, mode="bilinear", align_corners=False)
        return self.fine(h)


# ------------------------------------------------------------------------------------ losses
def pixel_cross_entropy(class_weights: list[float] | None = None):
    """Cross-entropy averaged over the labelled pixels (pixels labelled −1 are ignored)."""
    weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float32)

    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        if not bool((target != IGNORE_INDEX).any()):
            return prediction.sum() * 0.0  # every pixel ignored: no signal, but a gradient path
        w = None if weight is None else weight.to(prediction.device, prediction.dtype)
        return F.cross_entropy(prediction, target, weight=w, ignore_index=IGNORE_INDEX)
    return loss


def masked_pixel_loss(power: int):
    """Mean |prediction − target|^power over pixels with a finite target (NaN pixels have no value)."""
    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        valid = torch.isfinite(target)
        if not bool(valid.any()):
            return prediction.sum() * 0.0
        error = (prediction[valid] - target[valid]).abs()
        return (error if power == 1 else error ** power).mean()
    return loss
