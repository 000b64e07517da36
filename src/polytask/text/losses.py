"""The loss of the ``generation`` kind, registered in ``polytask.core.LOSSES`` (``tasks.NAME.loss``).

``token_ce`` (the default): the cross-entropy of each target token under the head's logits, the
mean over the non-padding positions of the batch (padding id 0 contributes nothing). Under teacher
forcing, position t's logits were computed from the gold tokens before t.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from polytask.core.losses import LOSSES, LossFunction, _number
from polytask.core.task import PAD_ID


def token_cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean over non-padding positions of −log softmax(logits)[target]; (N, T, V) logits, (N, T) ids."""
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=PAD_ID, label_smoothing=label_smoothing)


@LOSSES.register("token_ce", kinds=("generation",), default_for=("generation",), overwrite=True)
def token_ce(task: str, label_smoothing: float = 0.0) -> LossFunction:
    """Token cross-entropy over non-padding positions (the generation default); ``label_smoothing`` in [0, 1)."""
    smoothing = _number(label_smoothing, f"`label_smoothing` of loss 'token_ce' of task '{task}'", high=1.0, high_open=True)
    return lambda logits, target: token_cross_entropy(logits, target, smoothing)
