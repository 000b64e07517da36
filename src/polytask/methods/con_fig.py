"""ConFIG: the conflict-free update with equal cosine to every task gradient."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods.base import Method, Step, register


@register("config")
class ConFIG(Method):
    """ConFIG — Liu, Chu, Thuerey et al., "ConFIG: Towards Conflict-free Training of Physics
    Informed Neural Networks", ICLR 2025 (Eq. 2).

    With unit gradients U = D⁻¹ J (D = diag ‖gᵢ‖), the direction g_u = U⁺ 1 has the same positive
    cosine with every gᵢ (U g_u = 1 when the gradients are independent), and the update is
    g_u/‖g_u‖ rescaled by the sum of projections Σᵢ gᵢᵀ g_u/‖g_u‖. Since U⁺ = Uᵀ (U Uᵀ)⁺, all of it
    follows from G: with c = D⁻¹ (D⁻¹ G D⁻¹)⁺ 1 (so g_u = Jᵀ c),

        w = (1ᵀ G c / cᵀ G c) · c.

    Zero gradients get weight 0. The momentum variant (M-ConFIG) is not implemented.
    """

    needs = "gramian"

    def __init__(self) -> None:
        super().__init__()
        self._remember()

    def weights(self, step: Step) -> Tensor:
        g = step.gramian.double()
        norms = g.diagonal().clamp(min=0).sqrt()
        inv = torch.where(norms > torch.finfo(g.dtype).tiny, 1 / norms, torch.zeros_like(norms))
        cosines = inv[:, None] * g * inv[None, :]
        lam, vec = torch.linalg.eigh(cosines)
        keep = lam > lam.max().clamp(min=0) * len(g) * torch.finfo(step.gramian.dtype).eps
        pinv = (vec[:, keep] / lam[keep]) @ vec[:, keep].T
        c = inv * (pinv @ torch.ones_like(inv))
        sq_norm = c @ g @ c
        if sq_norm <= 0:
            return torch.zeros_like(step.losses)
        return ((g.sum(dim=0) @ c) / sq_norm * c).to(step.losses.dtype)
