"""Axis-aligned boxes: format conversions, IoU, generalized IoU and non-maximum suppression.

Boxes are ``(..., 4)`` tensors in pixels. ``xyxy`` = (x1, y1, x2, y2) with x2 ≥ x1, y2 ≥ y1 (the
format everything in :mod:`polytask.vision` uses), ``xywh`` = (x1, y1, width, height) (COCO's),
``cxcywh`` = (centre x, centre y, width, height). A pixel grid position ``(row, col)`` covers
``[col, col + 1) × [row, row + 1)``, so a box around pixels ``c0..c1`` has x1 = c0 and x2 = c1 + 1.

torchvision is not used: its PyPI wheels do not import beside every torch build, and these are a
few lines of tensor arithmetic.
"""

from __future__ import annotations

import torch
from torch import Tensor

#: a tiny constant keeping IoU and GIoU finite for zero-area boxes
EPS = 1e-7


def xywh_to_xyxy(boxes: Tensor) -> Tensor:
    x, y, w, h = boxes.unbind(-1)
    return torch.stack([x, y, x + w, y + h], dim=-1)


def xyxy_to_xywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x1, y1, x2 - x1, y2 - y1], dim=-1)


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def area(boxes: Tensor) -> Tensor:
    """Area of ``xyxy`` boxes (0 for degenerate ones)."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def _intersection_union(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    lt = torch.maximum(a[..., :2], b[..., :2])
    rb = torch.minimum(a[..., 2:], b[..., 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    return inter, area(a) + area(b) - inter


def iou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise IoU of ``xyxy`` boxes of broadcastable shapes ``(..., 4)``: |A ∩ B| / |A ∪ B|."""
    inter, union = _intersection_union(a, b)
    return inter / (union + EPS)


def pairwise_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU matrix ``(N, M)`` of ``xyxy`` boxes ``a`` (N, 4) and ``b`` (M, 4)."""
    return iou(a[:, None, :], b[None, :, :])


def giou(a: Tensor, b: Tensor) -> Tensor:
    """Element-wise generalized IoU of ``xyxy`` boxes (broadcastable ``(..., 4)``).

    Rezatofighi et al., "Generalized Intersection over Union: A Metric and a Loss for Bounding Box
    Regression", CVPR 2019: GIoU = IoU − |C \\ (A ∪ B)| / |C|, with C the smallest box enclosing A
    and B. It lies in (−1, 1]; 1 − GIoU is the box loss, which, unlike 1 − IoU, still has a
    gradient when the boxes do not overlap.
    """
    inter, union = _intersection_union(a, b)
    enclosing = area(torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], dim=-1))
    return inter / (union + EPS) - (enclosing - union) / (enclosing + EPS)


def nms(boxes: Tensor, scores: Tensor, threshold: float) -> Tensor:
    """Indices of the boxes kept by greedy non-maximum suppression, best score first.

    A box is dropped when its IoU with a kept, higher-scoring box exceeds ``threshold``.
    """
    order = scores.argsort(descending=True)
    if order.numel() == 0:
        return order
    overlaps = pairwise_iou(boxes[order], boxes[order])
    keep = torch.ones(len(order), dtype=torch.bool, device=boxes.device)
    for i in range(len(order)):
        if keep[i]:
            keep[i + 1:] &= overlaps[i, i + 1:] <= threshold
    return order[keep]


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, threshold: float) -> Tensor:
    """NMS within each class: boxes of different ``labels`` never suppress each other."""
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    # shifting each class's boxes by a distinct offset keeps classes apart in one NMS pass
    offset = labels.to(boxes.dtype)[:, None] * (boxes.max() - boxes.min() + 1)
    return nms(boxes + offset, scores, threshold)


def boxes_from_mask(mask: Tensor) -> Tensor:
    """The ``xyxy`` box of the True pixels of a (H, W) mask (pixel edges, so a single pixel at
    (row r, col c) gives (c, r, c + 1, r + 1)); an all-False mask is an error for the caller."""
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
