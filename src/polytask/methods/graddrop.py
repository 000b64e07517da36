"""GradDrop: per coordinate, keep only the task gradients of one randomly chosen sign."""

from __future__ import annotations

import torch

from polytask.core.errors import InvalidParameterError
from polytask.methods.base import Method, Step, Update, register

#: columns of J per block (2.6 MB of float32 at T = 10)
COLUMNS = 1 << 16


@register("graddrop")
class GradDrop(Method):
    """Gradient Sign Dropout — Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick
    a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (Alg. 1).

    Per coordinate k of θ, the positive sign purity P_k = ½ (1 + Σᵢ g_ik / Σᵢ |g_ik|) and one draw
    U_k ~ Uniform(0, 1) give the masks M_ik = [P_k > U_k][g_ik > 0] + [P_k < U_k][g_ik < 0];
    the update is d_k = Σᵢ (ℓ + (1 − ℓ) M_ik) g_ik with ``leak`` ℓ ∈ [0, 1] (ℓ = 1 is the plain
    sum). Coordinates where every gᵢ is 0 take P = ½. The heads get their own
    gradients unchanged (weights 1). U comes from ``step.generator`` (the engine's counter-based
    stream).

    Departures:
        As in TorchJD, the masks act on the parameter gradients J rather than on the activation
        gradients of the paper (where P is taken over the batch at the layer GradDrop is
        inserted after).
    """

    needs = "jacobian"
    stateful = True  # one uniform draw per coordinate and step

    def __init__(self, *, leak: float = 0.0) -> None:
        super().__init__()
        if not (isinstance(leak, (int, float)) and not isinstance(leak, bool) and 0 <= leak <= 1):
            raise InvalidParameterError(f"`leak` of `GradDrop` must be in [0, 1]; found {leak!r}")
        self.leak = float(leak)
        self._remember(leak=leak)

    def update(self, step: Step) -> Update:
        j = step.jacobian
        assert j is not None  # Method.forward checked
        # Per coordinate, the kept gradients are all the positive ones (P > U) or all the negative ones
        # (P < U), so Σᵢ M_ik g_ik is a column sum of J's positive or negative parts. J is taken in
        # blocks of columns, so the step holds J, the draw U and the direction, and temporaries of
        # one block (J is the step's largest tensor; masks and products of J's size were held
        # before). The same sums of the same terms as Σᵢ M_ik g_ik.
        u = torch.rand(j.shape[1], generator=step.generator, dtype=j.dtype).to(j.device)
        direction = torch.empty(j.shape[1], dtype=j.dtype, device=j.device)
        tiny = torch.finfo(j.dtype).tiny
        for start in range(0, j.shape[1], COLUMNS):
            cols = slice(start, start + COLUMNS)
            block = j[:, cols]
            signed, total = block.sum(dim=0), block.abs().sum(dim=0)
            purity = torch.where(total > 0, 0.5 * (1 + signed / total.clamp(min=tiny)), 0.5)
            kept = torch.where(purity > u[cols], block.clamp(min=0).sum(dim=0),
                               torch.where(purity < u[cols], block.clamp(max=0).sum(dim=0), 0.0))
            direction[cols] = kept if self.leak == 0.0 else self.leak * signed + (1 - self.leak) * kept
        return Update(torch.ones_like(step.losses), direction=direction)
