"""The losses of the vision kinds, registered in ``polytask.core.LOSSES`` (usable as ``tasks.NAME.loss``).

============================  =====================================================================
``pixel_ce`` (segmentation)   cross-entropy averaged over labelled pixels (−1 ignored); ``class_weights``
``masked_l1`` (dense_regr.)   mean |p − y| over pixels with a finite target (the default)
``masked_mse`` (dense_regr.)  mean (p − y)² over pixels with a finite target
``fcos`` (detection)          focal + ``l1_weight``·L1 + ``giou_weight``·(1 − GIoU), see ``detection``
============================  =====================================================================
"""

from __future__ import annotations

from polytask.core.losses import LOSSES, LossFunction, _number, _vector
from polytask.vision.dense import masked_pixel_loss, pixel_cross_entropy
from polytask.vision.detection import DetectionLoss


@LOSSES.register("pixel_ce", kinds=("segmentation",), default_for=("segmentation",), overwrite=True)
def pixel_ce(num_classes: int, task: str, class_weights: list[float] | None = None) -> LossFunction:
    """Per-pixel cross-entropy (the segmentation default), mean over pixels not labelled −1.

    ``class_weights``: one weight ≥ 0 per class (torch's weighted mean over pixels)."""
    weights = None if class_weights is None else _vector(class_weights, num_classes,
                                                         f"`class_weights` of loss 'pixel_ce' of task '{task}'")
    return pixel_cross_entropy(weights)


@LOSSES.register("masked_l1", kinds=("dense_regression",), default_for=("dense_regression",), overwrite=True)
def masked_l1() -> LossFunction:
    """Mean absolute error over pixels with a finite target (the dense_regression default; NaN = no value)."""
    return masked_pixel_loss(1)


@LOSSES.register("masked_mse", kinds=("dense_regression",), overwrite=True)
def masked_mse() -> LossFunction:
    """Mean squared error over pixels with a finite target (NaN = no value)."""
    return masked_pixel_loss(2)


@LOSSES.register("fcos", kinds=("detection",), default_for=("detection",), overwrite=True)
def fcos(num_classes: int, task: str, l1_weight: float = 1.0, giou_weight: float = 2.0, alpha: float = 0.25,
         gamma: float = 2.0) -> LossFunction:
    """Detection loss (the default): sigmoid focal (``alpha``, ``gamma``) + ``l1_weight``·L1 + ``giou_weight``·(1 − GIoU).

    Per positive cell of the FCOS-like assignment, normalised by the number of positives
    (Tian et al., ICCV 2019; GIoU: Rezatofighi et al., CVPR 2019). ``alpha`` < 0 turns the α
    weighting off."""
    where = f"of loss 'fcos' of task '{task}'"
    return DetectionLoss(num_classes, _number(l1_weight, f"`l1_weight` {where}"), _number(giou_weight, f"`giou_weight` {where}"),
                         _number(alpha, f"`alpha` {where}", low=-1.0, high=1.0), _number(gamma, f"`gamma` {where}"))
