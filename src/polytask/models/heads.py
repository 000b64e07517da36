"""Task heads: a linear layer or a small MLP from the shared representation to a task's outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.task import VISION_KINDS, Task
from polytask.vision.dense import PixelHead
from polytask.vision.detection import DetectionHead
from polytask.vision.feature_map import FeatureMap


def layer_sizes(value: object, key: str = "hidden", who: str | None = None, *, allow_empty: bool = True) -> list[int]:
    """``value`` as a list of layer widths, or an error that says a list of positive ints is
    expected (a string such as ``"16"`` or a bare ``16`` is not one, nor is ``true``)."""
    where = f"`{key}`" + (f" of `{who}`" if who else "")
    ok = isinstance(value, Sequence) and not isinstance(value, (str, bytes))
    if ok and all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in value):  # type: ignore[union-attr]
        sizes = [int(h) for h in value]  # type: ignore[union-attr]
        if sizes or allow_empty:
            return sizes
        raise InvalidParameterError(f"{where} needs at least one layer size, e.g. [128, 64]; found []")
    hint = ""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        hint = f" (for one layer of {value} write [{value}])" if str(value).strip().isdigit() else ""
    raise InvalidParameterError(f"{where} must be a list of positive ints (one width per layer), e.g. [128, 64]; "
                                f"found {value!r}{hint}")


def mlp_layers(in_features: int, hidden: Sequence[int], out_features: int | None, *, dropout: float = 0.0,
               activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Linear → activation (→ dropout) blocks, then an optional final linear layer."""
    hidden = layer_sizes(hidden)
    if not 0.0 <= dropout < 1.0:
        raise InvalidParameterError(f"`dropout` must be in [0, 1); found {dropout}")
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = h
    if out_features is not None:
        layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


def make_head(in_features: int, out_features: int, hidden: Sequence[int] = (), dropout: float = 0.0, *,
              task: Task | None = None, feature_map: FeatureMap | None = None) -> nn.Module:
    """A task head: linear when ``hidden`` is empty, else an MLP. For a ``task`` of a vision kind,
    the head that reads the encoder's ``feature_map`` (z flattened, ``in_features`` = C·h·w): a
    :class:`~polytask.vision.dense.PixelHead` (segmentation, dense_regression) or a
    :class:`~polytask.vision.detection.DetectionHead` (detection)."""
    if task is None or task.kind not in VISION_KINDS:
        return mlp_layers(in_features, hidden, out_features, dropout=dropout)
    if feature_map is None or feature_map.size != in_features:
        found = "none" if feature_map is None else f"a {feature_map.size}-value map for a {in_features}-wide representation"
        raise InvalidParameterError(
            f"{task.kind} task '{task.name}' needs an encoder that exposes its feature map (an encoder with a "
            f"`feature_map` attribute, e.g. encoder: {{name: cnn_map, image_size: [H, W]}}); found {found}")
    if task.kind == "detection":
        return DetectionHead(feature_map, task.num_classes)  # type: ignore[arg-type]
    return PixelHead(feature_map, task.out_features, task.size)


class ConvBranch(nn.Module):
    """A task's private conv layers on a flattened feature map: ``depth`` conv 3×3 → BN → ReLU
    blocks keeping (C, h, w), flattened again (``task_branches`` on a feature-map encoder)."""

    def __init__(self, feature_map: FeatureMap, depth: int) -> None:
        super().__init__()
        c = feature_map.channels
        self.feature_map = feature_map
        self.net = nn.Sequential(*[m for _ in range(depth) for m in (nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())])

    def forward(self, z: Tensor) -> Tensor:
        return self.net(self.feature_map.unflatten(z, "task branch")).flatten(1)


class DenseHead(nn.Module):
    """Per-pixel head for segmentation- or depth-like tasks: (B, C, h, w) feature maps →
    3×3 conv → ReLU → 1×1 conv to ``out_channels`` → bilinear upsampling to ``output_size``
    (when given), i.e. (B, out_channels, H, W) logits or values, one per pixel."""

    def __init__(self, in_channels: int, out_channels: int, *, hidden_channels: int = 64,
                 output_size: tuple[int, int] | None = None) -> None:
        super().__init__()
        for key, value in (("in_channels", in_channels), ("out_channels", out_channels),
                           ("hidden_channels", hidden_channels)):
            if not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"`{key}` of DenseHead must be a positive int; found {value!r}")
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden_channels, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(hidden_channels, out_channels, 1))
        self.output_size = None if output_size is None else (int(output_size[0]), int(output_size[1]))

    def forward(self, features: Tensor) -> Tensor:
        out = self.net(features)
        if self.output_size is not None and tuple(out.shape[-2:]) != self.output_size:
            out = F.interpolate(out, size=self.output_size, mode="bilinear", align_corners=False)
        return out
