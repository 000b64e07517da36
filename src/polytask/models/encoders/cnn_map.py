"""The ``cnn`` encoder without its pooling and projection: z is the last block's feature map, flattened."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from polytask.core.errors import InvalidParameterError
from polytask.models.encoders.base import ENCODERS
from polytask.models.encoders.cnn import CNN
from polytask.vision.feature_map import FeatureMap


@ENCODERS.register("cnn_map")
class CNNFeatureMap(CNN):
    """Conv(3×3) → BatchNorm → ReLU → MaxPool blocks, as ``cnn``, whose output is the feature map
    itself: z = (batch, C·h·w) with C the last block's channels and (h, w) = ``image_size`` / 2^blocks.

    The heads of per-pixel and detection tasks unflatten z to (batch, C, h, w) through
    ``feature_map`` (a :class:`~polytask.vision.FeatureMap`); heads of image-level tasks read the flat
    vector like any other representation. A subclass of ``cnn``, so ``mtan`` attends over its blocks
    and ``cross_stitch`` cuts it into stages the same way.

    Args:
        image_size: (H, W) of the input images; both must be divisible by 2^blocks. An image of
            another size is pooled (adaptive average) to the same (h, w) map.
    """

    def __init__(self, *, image_size: Sequence[int], in_channels: int = 1, channels: Sequence[int] = (32, 64)) -> None:
        super().__init__(in_channels=in_channels, channels=channels, out_features=1, pool=1)
        size = tuple(image_size) if isinstance(image_size, (list, tuple)) else ()
        stride = 2 ** len(self.channels)
        if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in size):
            raise InvalidParameterError(f"`image_size` of `cnn_map` must be [height, width], two positive ints; found {image_size!r}")
        if size[0] % stride or size[1] % stride:
            raise InvalidParameterError(f"`image_size` {list(size)} of `cnn_map` must be divisible by 2^{len(self.channels)} = "
                                        f"{stride} (one max-pool per block); pad or crop the images, or use fewer blocks")
        self.feature_map = FeatureMap(self.channels[-1], size[0] // stride, size[1] // stride, stride)
        self.image_size = size
        self.pool = nn.AdaptiveAvgPool2d((self.feature_map.height, self.feature_map.width))
        self.proj = nn.Identity()
        self.out_features = self.feature_map.size
