"""Single-stage, anchor-free detection on one feature map: head, target assignment, loss, decoding.

The head follows FCOS (Tian, Shen, Chen & He, "FCOS: Fully Convolutional One-Stage Object
Detection", ICCV 2019) on one feature level: every cell centre p = ((j + ½)·s, (i + ½)·s) of the
stride-s map predicts, per class, a logit that an object of that class is there, and the distances
(l, t, r, b) from p to the four sides of its box: box = (pₓ − l, p_y − t, pₓ + r, p_y + b), with
(l, t, r, b) = s · exp(raw) so they stay positive.

The prediction of a detection task is one tensor per image, (A, 6 + C) for A = h·w cells:
``[pₓ, p_y, l, t, r, b, logit₁ … logit_C]`` (the cell centres ride along as constants so that the
loss and the decoder need nothing but the prediction). The target is (K, 5) rows
``[class, x1, y1, x2, y2]`` in pixels, padded with class −1 rows up to the data set's K.

Assignment: a cell is a positive of a ground-truth box when its centre lies inside the box, and
the cell nearest to each box centre always is (so boxes smaller than a cell still get one); a cell
inside several boxes takes the smallest (FCOS's rule for ambiguous locations).

Loss (per batch, normalised by the number of positives as in FCOS):
``focal(logits) + λ_L1 · L1(box) + λ_GIoU · (1 − GIoU(box))``: sigmoid focal loss over every cell
and class (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017; α = 0.25, γ = 2), and on
positive cells the L1 distance of the box corners and the generalized-IoU loss (Rezatofighi et
al., CVPR 2019), the box pair of DETR (Carion et al., ECCV 2020).

Departures: one feature level (no FPN, so no per-level size ranges); no centre-ness branch; the
nearest-cell positive added; the L1 term is taken on corners divided by the ground-truth box's
width and height (DETR divides by the image size, which the prediction does not carry).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.vision.boxes import EPS, giou, iou
from polytask.vision.feature_map import FeatureMap

#: columns before the class logits in a detection prediction: cx, cy, l, t, r, b
BOX_COLUMNS = 6
#: columns of a detection target row: class, x1, y1, x2, y2
TARGET_COLUMNS = 5


class DetectionHead(nn.Module):
    """FCOS-like head: a shared tower of ``depth`` conv 3×3 → GroupNorm → ReLU blocks, then a conv 3×3
    to the class logits (bias −log((1 − π)/π), π = 0.01: the focal-loss prior) and one to the 4
    distances. (batch, C·h·w) → (batch, h·w, 6 + num_classes)."""

    def __init__(self, feature_map: FeatureMap, num_classes: int, *, hidden_channels: int = 32, depth: int = 2,
                 prior: float = 0.01) -> None:
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise InvalidParameterError(f"`num_classes` of DetectionHead must be a positive int; found {num_classes!r}")
        self.feature_map = feature_map
        self.num_classes = num_classes
        layers: list[nn.Module] = []
        width = feature_map.channels
        for _ in range(depth):
            layers += [nn.Conv2d(width, hidden_channels, 3, padding=1), nn.GroupNorm(_groups(hidden_channels), hidden_channels),
                       nn.ReLU()]
            width = hidden_channels
        self.tower = nn.Sequential(*layers)
        self.classes = nn.Conv2d(width, num_classes, 3, padding=1)
        self.distances = nn.Conv2d(width, 4, 3, padding=1)
        nn.init.constant_(self.classes.bias, -math.log((1 - prior) / prior))
        nn.init.zeros_(self.distances.bias)
        s, h, w = feature_map.stride, feature_map.height, feature_map.width
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        centres = torch.stack([(xs.flatten() + 0.5) * s, (ys.flatten() + 0.5) * s], dim=-1).float()
        self.register_buffer("centres", centres, persistent=False)

    def forward(self, z: Tensor) -> Tensor:
        t = self.tower(self.feature_map.unflatten(z, "detection head"))
        n = len(t)
        logits = self.classes(t).flatten(2).transpose(1, 2)
        # exp keeps distances positive; the clamp keeps exp finite while the head is untrained
        distances = self.distances(t).clamp(max=8.0).exp().flatten(2).transpose(1, 2) * self.feature_map.stride
        centres = self.centres.to(logits.dtype).expand(n, -1, -1)
        return torch.cat([centres, distances, logits], dim=-1)


def _groups(channels: int) -> int:
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)


def boxes_of(prediction: Tensor) -> Tensor:
    """The ``xyxy`` boxes of a prediction (..., A, 6 + C)."""
    centres, d = prediction[..., :2], prediction[..., 2:BOX_COLUMNS]
    return torch.cat([centres - d[..., :2], centres + d[..., 2:]], dim=-1)


def assign(centres: Tensor, target: Tensor) -> Tensor:
    """The index of the ground-truth row each cell learns from, −1 for background: (N, A).

    ``centres`` (A, 2), ``target`` (N, K, 5) with padding rows of class −1."""
    valid = target[..., 0] >= 0                                              # (N, K)
    boxes = target[..., 1:]                                                  # (N, K, 4)
    px, py = centres[:, 0][None, :, None], centres[:, 1][None, :, None]     # (1, A, 1)
    inside = (px > boxes[..., 0][:, None]) & (px < boxes[..., 2][:, None]) \
        & (py > boxes[..., 1][:, None]) & (py < boxes[..., 3][:, None])     # (N, A, K)
    middle = (boxes[..., :2] + boxes[..., 2:]) / 2                           # (N, K, 2)
    distance = (centres[None, :, None, :] - middle[:, None]).pow(2).sum(-1)  # (N, A, K)
    nearest = F.one_hot(distance.argmin(1), len(centres)).transpose(1, 2).bool()
    candidate = (inside | nearest) & valid[:, None, :]
    areas = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]))[:, None, :].expand_as(candidate)
    cost = torch.where(candidate, areas, torch.full_like(areas, float("inf")))
    best = cost.argmin(-1)
    return torch.where(candidate.any(-1), best, torch.full_like(best, -1))


def sigmoid_focal(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Element-wise sigmoid focal loss −α_t (1 − p_t)^γ log p_t (Lin et al., ICCV 2017)."""
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p = torch.sigmoid(logits)
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss


@dataclass(frozen=True)
class DetectionLoss:
    """focal + l1_weight · L1 + giou_weight · (1 − GIoU), divided by the number of positive cells."""

    num_classes: int
    l1_weight: float = 1.0
    giou_weight: float = 2.0
    alpha: float = 0.25
    gamma: float = 2.0

    def __call__(self, prediction: Tensor, target: Tensor) -> Tensor:
        parts = self.parts(prediction, target)
        return parts["focal"] + self.l1_weight * parts["l1"] + self.giou_weight * parts["giou"]

    def parts(self, prediction: Tensor, target: Tensor) -> dict[str, Tensor]:
        logits = prediction[..., BOX_COLUMNS:]
        matched = assign(prediction[0, :, :2].detach(), target)              # (N, A)
        positive = matched >= 0
        rows = target.gather(1, matched.clamp(min=0)[..., None].expand(-1, -1, TARGET_COLUMNS))  # (N, A, 5)
        labels = torch.zeros_like(logits)
        labels[positive] = F.one_hot(rows[positive][:, 0].long(), self.num_classes).to(logits.dtype)
        count = max(int(positive.sum()), 1)
        focal = sigmoid_focal(logits, labels, self.alpha, self.gamma).sum() / count
        predicted, truth = boxes_of(prediction)[positive], rows[positive][:, 1:]
        if len(truth) == 0:
            zero = prediction[..., :BOX_COLUMNS].sum() * 0.0
            return {"focal": focal, "l1": zero, "giou": zero}
        size = (truth[:, 2:] - truth[:, :2]).clamp(min=EPS).repeat(1, 2)
        l1 = ((predicted - truth).abs() / size).mean(-1).sum() / count
        box = (1 - giou(predicted, truth)).sum() / count
        return {"focal": focal, "l1": l1, "giou": box}


@dataclass(frozen=True)
class Decoder:
    """Prediction → detections: per image, the best ``pre_nms`` (cell, class) pairs whose
    probability exceeds ``score_threshold``, suppressed within each class at ``iou_threshold``,
    at most ``max_detections`` (COCO evaluates up to 100 per image; 50 by default keeps an untrained
    model's evaluation fast, and images with more than 50 objects should raise it).

    Suppression is Fast NMS (Bolya, Zhou, Xiao & Lee, "YOLACT: Real-time Instance Segmentation",
    ICCV 2019): a candidate is dropped when any higher-scoring candidate of its class overlaps it
    by more than ``iou_threshold``, whether or not that one was kept itself. It runs on the whole
    batch as tensor operations (greedy NMS, ``boxes.nms``, loops box by box).

    Departures: Fast NMS instead of greedy NMS (it may drop a few more boxes, the YOLACT paper
    measures 0.1-0.3 mAP less on COCO).
    """

    score_threshold: float = 0.05
    iou_threshold: float = 0.6
    pre_nms: int = 50
    max_detections: int = 50

    def candidates(self, prediction: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(boxes (N, k, 4), scores (N, k), labels (N, k), kept (N, k) bool), best score first."""
        prediction = prediction.detach().float()
        boxes, scores = boxes_of(prediction), torch.sigmoid(prediction[..., BOX_COLUMNS:])
        n, cells, num_classes = scores.shape
        k = min(self.pre_nms, cells * num_classes)
        top, index = scores.flatten(1).topk(k, dim=1)                           # sorted, best first
        cell, labels = index // num_classes, index % num_classes
        chosen = boxes.gather(1, cell[..., None].expand(-1, -1, 4)).clamp(min=0)
        overlap = iou(chosen[:, :, None], chosen[:, None, :])                   # (N, k, k)
        rivals = (labels[:, :, None] == labels[:, None, :]) & torch.ones(k, k, dtype=torch.bool, device=top.device).triu(1)
        suppressed = (overlap * rivals).amax(1) > self.iou_threshold           # by any better box of its class
        kept = (top > self.score_threshold) & ~suppressed
        kept &= kept.cumsum(1) <= self.max_detections
        return chosen, top, labels, kept

    def __call__(self, prediction: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        """A list of (boxes (M, 4) xyxy, scores (M,), labels (M,) int64), one per image."""
        boxes, scores, labels, kept = self.candidates(prediction)
        return [(b[k], s[k], c[k]) for b, s, c, k in zip(boxes, scores, labels, kept)]

    def padded(self, prediction: Tensor) -> Tensor:
        """The detections as one (N, M, 6) tensor ``[x1, y1, x2, y2, score, class]``, class −1 = padding."""
        boxes, scores, labels, kept = self.candidates(prediction)
        m = max(int(kept.sum(1).max()) if kept.numel() else 0, 1)
        order = (~kept).float().argsort(dim=1, stable=True)[:, :m]            # kept ones first, in score order
        rows = torch.cat([boxes, scores[..., None], labels[..., None].float()], dim=-1).gather(1, order[..., None].expand(-1, -1, 6))
        rows[..., 5] = torch.where(kept.gather(1, order), rows[..., 5], torch.full_like(rows[..., 5], -1.0))
        return rows
