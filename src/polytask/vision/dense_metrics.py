"""The per-pixel error metric of ``dense_regression`` (see :mod:`polytask.vision.dense` for the targets).

Apart from :mod:`polytask.vision.dense` because it subclasses ``torchmetrics.Metric``: importing
torchmetrics takes seconds (it imports its text and audio modules, and transformers when that is
installed), and the models, whose heads come from :mod:`polytask.vision.dense`, need none of it.
"""

from __future__ import annotations

import torch
import torchmetrics
from torch import Tensor


class PixelError(torchmetrics.Metric):
    """Mean absolute error (``relative=False``) or mean absolute relative error |p − y| / |y|
    (``relative=True``, pixels with y = 0 left out) over pixels with a finite target.

    The error measures of depth estimation (Eigen, Puhrsch & Fergus, "Depth Map Prediction from a
    Single Image using a Multi-Scale Deep Network", NeurIPS 2014: "abs rel").
    """

    higher_is_better = False
    full_state_update = False

    def __init__(self, relative: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.relative = relative
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, prediction: Tensor, target: Tensor) -> None:
        valid = torch.isfinite(target)
        if self.relative:
            valid &= target != 0
        error = (prediction[valid].double() - target[valid].double()).abs()
        if self.relative:
            error = error / target[valid].double().abs()
        self.total += error.sum()
        self.count += int(valid.sum())

    def compute(self) -> Tensor:
        return self.total / self.count if self.count > 0 else torch.tensor(float("nan"), dtype=torch.float64)
