"""R², the coefficient of determination, with float64 sums."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import regression

#: relative size, against Σy², below which the one-pass total sum of squares counts as zero: the
#: rounding of Σy² − (Σy)²/n in float64 (targets whose spread is under ~10⁻⁷ of their magnitude,
#: which float32 values cannot resolve, count as constant)
_CONSTANT = 2.0 ** -45


class R2Score(regression.R2Score):
    """R² = 1 − SS_res / SS_tot over the epoch's samples, with SS_res = Σ(y − ŷ)² and
    SS_tot = Σ(y − ȳ)² = Σy² − (Σy)²/n, as ``sklearn.metrics.r2_score`` (its default
    ``force_finite``): constant targets (SS_tot = 0) give 1 for exact predictions and 0 otherwise.

    Departures from torchmetrics' ``R2Score``: the sums are kept and updated in float64 (float32
    sums of y² lose SS_tot to cancellation once the targets' mean is large against their spread:
    mean 5000, sd 1 gave 0.95 for sklearn's 0.75); and SS_tot counts as zero only below a relative
    tolerance (2⁻⁴⁵·Σy², the one-pass formula's rounding), not torchmetrics' absolute 10⁻⁴ on
    SS_res and SS_tot (which reports 1 or 0 for targets in small units). Under torch.distributed
    the four sums are summed over ranks (torchmetrics' sync), float64 on every rank.
    """

    def __init__(self) -> None:
        super().__init__()
        for name in ("sum_squared_error", "sum_error", "residual"):  # torchmetrics' names: Σy², Σy, Σ(y − ŷ)²
            self.add_state(name, default=torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        super().update(preds.double(), target.double())

    def compute(self) -> Tensor:  # type: ignore[override]
        squares, total, rss = self.sum_squared_error, self.sum_error, self.residual
        tss = squares - total * (total / self.total)
        constant = tss <= _CONSTANT * squares
        exact = torch.where(rss == 0, 1.0, 0.0).to(rss.dtype)
        return torch.where(constant, exact, 1 - rss / torch.where(constant, 1.0, tss))
