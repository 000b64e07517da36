"""Vision tasks: per-pixel (``segmentation``, ``dense_regression``) and ``detection`` kinds.

- :mod:`~polytask.vision.boxes`: box formats, IoU, GIoU (Rezatofighi et al., CVPR 2019), NMS;
- :mod:`~polytask.vision.feature_map`: what a feature-map encoder exposes (``FeatureMap``);
- :mod:`~polytask.vision.dense`: per-pixel head, pixel cross-entropy with an ignore index, masked
  L1/L2, mIoU / pixel accuracy / absolute and relative error;
- :mod:`~polytask.vision.detection`: the single-stage anchor-free head (FCOS-like, Tian et al.,
  ICCV 2019), target assignment, the focal + L1 + GIoU loss, decoding;
- :mod:`~polytask.vision.coco_eval`: mAP@0.5 and mAP@[.5:.95] from pycocotools.

Importing this package registers the losses of the three kinds in ``polytask.core.LOSSES``
(``polytask.core.losses`` imports it on first need). It imports only ``polytask.core`` and torch;
pycocotools is imported when a mAP is computed (``pip install 'polytask[vision]'``).
"""

from __future__ import annotations

from polytask.vision import losses  # noqa: F401  (registers the losses)
from polytask.vision.boxes import batched_nms, cxcywh_to_xyxy, giou, iou, nms, pairwise_iou, xywh_to_xyxy, xyxy_to_cxcywh, xyxy_to_xywh
from polytask.vision.dense import IGNORE_INDEX  # −1: an unlabelled pixel; a detection target row of class −1 is padding
from polytask.vision.feature_map import FeatureMap

__all__ = ["IGNORE_INDEX", "FeatureMap", "batched_nms", "cxcywh_to_xyxy", "giou", "iou", "nms", "pairwise_iou",
           "xywh_to_xyxy", "xyxy_to_cxcywh", "xyxy_to_xywh"]
