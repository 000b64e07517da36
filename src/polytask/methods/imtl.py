"""IMTL: IMTL-L's learned loss scales feeding IMTL-G's impartial gradient weights."""

from __future__ import annotations

import torch

from polytask.methods._gramian_qp import as_float64
from polytask.methods.base import Step, Update, register
from polytask.methods.imtl_g import imtl_g_weights
from polytask.methods.imtl_l import IMTLL


@register("imtl")
class IMTL(IMTLL):
    """Impartial multi-task learning — Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards
    Impartial Multi-task Learning", ICLR 2021 (Algorithm 1: IMTL-L and IMTL-G together), as LibMTL's
    ``IMTL`` combines them.

    IMTL-L scales every loss, L̃ᵢ = e^(sᵢ)Lᵢ − sᵢ with a learnable sᵢ (``nn.Parameter``, from 0), so
    the scaled gradients are g̃ᵢ = e^(sᵢ)gᵢ; IMTL-G then weights those: α = IMTL-G(D G D), D = diag(e^s),
    Σαᵢ = 1 with equal projections of d onto every unit gradient. The shared parameters receive

        d = Σᵢ αᵢ g̃ᵢ = Σᵢ αᵢ e^(sᵢ) gᵢ,   i.e. wᵢ = αᵢ e^(sᵢ) (detached)

    and s is trained on Σᵢ (e^(sᵢ)Lᵢ − sᵢ) with the losses detached (the update's penalty), whose
    gradient e^(sᵢ)Lᵢ − 1 vanishes when every scaled loss is 1: IMTL-L's balance. IMTL-G's direction
    is invariant to the task scales, so s sets the size of each task's part, α the direction.
    IMTL-G's singular-Gramian behaviour is ``imtl_g``'s (see its Departures). LibMTL cannot be
    installed beside this torch; the test re-derives its ``IMTL.backward`` (the closed form on the
    scaled gradients) and compares the weights and the scales' gradient.

    Departures: the task-specific heads receive what ``engine.heads`` says (unweighted: ∇Lᵢ;
    weighted: wᵢ∇Lᵢ); LibMTL back-propagates e^(sᵢ)∇Lᵢ into them.
    """

    needs = "gramian"  # IMTL-L's learnable scales (``__init__``, ``reset_state``), IMTL-G's direction on top

    def update(self, step: Step) -> Update:
        s = self.log_scales[self.index(step)]
        scales = torch.exp(s.detach().to(device="cpu", dtype=torch.float64))
        g = as_float64(step.gramian, type(self).__name__)
        alpha = imtl_g_weights(scales[:, None] * g * scales[None, :])
        w = (alpha * scales).to(dtype=step.losses.dtype, device=step.losses.device)
        losses = step.losses.detach().to(s.dtype)
        penalty = (torch.exp(s) * losses - s).sum().to(step.losses.dtype)
        return Update(w, penalty=penalty)
