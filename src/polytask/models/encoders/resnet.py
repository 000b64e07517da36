"""A small ResNet image encoder written against torch only (torchvision is not needed)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.models.encoders.base import ENCODERS
from polytask.models.heads import layer_sizes

STEMS = ("small", "imagenet")


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut (a 1×1 conv-BN when the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_channels))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@ENCODERS.register("resnet")
class ResNet(nn.Module):
    """Residual network — He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition",
    CVPR 2016 (basic blocks, the ResNet-18/34 family).

    stem → stages of ``blocks[s]`` basic blocks with ``channels[s]`` channels (every stage after the
    first halves the resolution with a stride-2 first block and a 1×1 projection shortcut) →
    global average pooling → Linear(channels[-1], ``out_features``) → ReLU → Dropout.

    ``stem: small`` (default) is one 3×3 conv-BN-ReLU at full resolution, for small images (CIFAR,
    MNIST); ``stem: imagenet`` is the paper's 7×7 stride-2 conv-BN-ReLU and 3×3 stride-2 max-pool.
    The defaults, channels (16, 32, 64) and two blocks per stage, are a ~0.2M-parameter network for
    small images; channels (64, 128, 256, 512), blocks (2, 2, 2, 2) and ``stem: imagenet`` is ResNet-18
    (the test checks torchvision's parameter count, 11 689 512 with a 1000-way output layer). Global
    pooling makes the output width independent of the image size.
    """

    def __init__(self, *, in_channels: int = 3, channels: Sequence[int] = (16, 32, 64), blocks: Sequence[int] = (2, 2, 2),
                 out_features: int = 128, stem: str = "small", dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(in_channels, int) or isinstance(in_channels, bool) or in_channels < 1:
            raise InvalidParameterError(f"`in_channels` of `resnet` must be a positive int; found {in_channels!r}")
        channels = layer_sizes(channels, "channels", "resnet", allow_empty=False)
        blocks = layer_sizes(blocks, "blocks", "resnet", allow_empty=False)
        if len(blocks) != len(channels):
            raise InvalidParameterError(f"`blocks` of `resnet` needs one count per stage of `channels` "
                                        f"({len(channels)}); found {list(blocks)}")
        if stem not in STEMS:
            raise InvalidParameterError(f"`stem` of `resnet` must be one of {', '.join(STEMS)}; found {stem!r}")
        if not isinstance(out_features, int) or isinstance(out_features, bool) or out_features < 1:
            raise InvalidParameterError(f"`out_features` of `resnet` must be a positive int; found {out_features!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise InvalidParameterError(f"`dropout` of `resnet` must be in [0, 1); found {dropout!r}")
        first = channels[0]
        if stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(in_channels, first, 7, stride=2, padding=3, bias=False),
                                      nn.BatchNorm2d(first), nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        else:
            self.stem = nn.Sequential(nn.Conv2d(in_channels, first, 3, padding=1, bias=False), nn.BatchNorm2d(first),
                                      nn.ReLU(inplace=True))
        stages, width = [], first
        for s, (c, n) in enumerate(zip(channels, blocks, strict=True)):
            layers = [BasicBlock(width, c, 1 if s == 0 else 2)] + [BasicBlock(c, c, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            width = c
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.proj = nn.Sequential(nn.Linear(width, out_features), nn.ReLU(), nn.Dropout(dropout))
        self.in_channels, self.channels, self.out_features = in_channels, [int(c) for c in channels], out_features

    def stages(self) -> list[nn.Module]:
        """The encoder cut between stages (the stem goes with the first; cross-stitch units go between)."""
        tail = nn.Sequential(self.pool, nn.Flatten(1), self.proj)
        return [nn.Sequential(self.stem, self.layers[0]), *self.layers[1:], tail]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.pool(self.layers(self.stem(self._check(x)))).flatten(1))

    def _check(self, x: Tensor) -> Tensor:
        if x.dim() == 3 and self.in_channels == 1:  # (B, H, W) grayscale
            x = x.unsqueeze(1)
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ShapeError(f"`resnet` expects images (batch, {self.in_channels}, H, W); found {tuple(x.shape)}")
        return x
