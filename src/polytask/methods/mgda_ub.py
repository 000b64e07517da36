"""MGDA-UB: MGDA on the Gramian of the gradients w.r.t. the shared representation."""

from __future__ import annotations

from polytask.methods.base import register
from polytask.methods.mgda import MGDA


@register("mgda_ub")
class MGDAUB(MGDA):
    """MGDA-UB — Sener & Koltun, NeurIPS 2018, Section 3.3 (the upper bound).

    Same problem as :class:`MGDA`, min_{w ≥ 0, Σw = 1} wᵀGw, but G is the Gramian of ∇_z Lᵢ, the
    gradients w.r.t. the shared representation z (summed over the batch), which costs about one
    backward instead of T. The paper shows the resulting update still decreases an upper bound of
    every task loss when the encoder's Jacobian ∂z/∂θ has full rank. It is :class:`MGDA` whose
    default ``compare`` is ``features``; ``compare="shared"`` makes it exactly MGDA on θ.
    """

    compare = "features"
