"""Balanced accuracy: the mean recall over the classes present in the targets.

For binary and multiclass tasks this is ``sklearn.metrics.balanced_accuracy_score``: with
TPᵢ the rows of class i predicted as i and nᵢ the rows whose target is i,

    balanced accuracy = (1/|K|) Σ_{i ∈ K} TPᵢ / nᵢ,    K = {i : nᵢ > 0}.

A class absent from the targets has no recall and is left out of the mean (sklearn does the same,
with a warning), also when it is predicted: its false positives already lower the recall of the
classes those rows belong to. For a multilabel task it is the mean over labels of each label's
binary balanced accuracy (that label's column as a binary task), a definition of polytask's
(sklearn's ``balanced_accuracy_score`` does not take multilabel targets). The counts are
torchmetrics' stat scores (summed over ranks under torch.distributed); the value is computed in
float64. Binary and multilabel predictions are thresholded at 0.5 (``threshold``).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import classification


def _binary_balanced(tp: Tensor, fp: Tensor, tn: Tensor, fn: Tensor) -> Tensor:
    """(TPR + TNR) / 2 of each label, or the recall of the only class its targets hold."""
    positives, negatives = (tp + fn).double(), (tn + fp).double()
    has_pos, has_neg = positives > 0, negatives > 0
    tpr = torch.where(has_pos, tp.double() / positives.clamp(min=1), 0.0)
    tnr = torch.where(has_neg, tn.double() / negatives.clamp(min=1), 0.0)
    return (tpr + tnr) / (has_pos.double() + has_neg.double())  # NaN only for no row at all


class BinaryBalancedAccuracy(classification.BinaryStatScores):
    """(TPR + TNR) / 2 of a binary task (sklearn's ``balanced_accuracy_score``); the recall of
    the one class present when the targets hold one class only."""

    def compute(self) -> Tensor:  # type: ignore[override]
        return _binary_balanced(*self._final_state())


class MultilabelBalancedAccuracy(classification.MultilabelStatScores):
    """The mean over labels of each label's binary balanced accuracy."""

    def __init__(self, num_labels: int, **kwargs) -> None:
        super().__init__(num_labels=num_labels, average=None, **kwargs)

    def compute(self) -> Tensor:  # type: ignore[override]
        return _binary_balanced(*self._final_state()).mean()


class MulticlassBalancedAccuracy(classification.MulticlassStatScores):
    """The mean recall (TPᵢ / nᵢ) over the classes present in the targets (argmax of the
    logits as the prediction), sklearn's ``balanced_accuracy_score``."""

    def __init__(self, num_classes: int, **kwargs) -> None:
        super().__init__(num_classes=num_classes, average=None, **kwargs)

    def compute(self) -> Tensor:  # type: ignore[override]
        tp, _, _, fn = self._final_state()
        support = (tp + fn).double()
        present = support > 0
        recall = tp.double() / support.clamp(min=1)
        return (recall * present).sum() / present.sum()  # NaN only for no row at all
