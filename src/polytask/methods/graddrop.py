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
        # Per coordinate, the kept gradients are all the positive ones (P > U) or all the negative
        # ones (P < U): the column sums pos and neg of J's positive and negative parts, the same sums
        # of the same terms as Σᵢ M_ik g_ik. With Σᵢgᵢ = pos + neg and Σᵢ|gᵢ| = pos − neg,
        # P > U  ⇔  pos + neg > (2U − 1)(pos − neg), so no division is needed (an all-zero column
        # keeps nothing either way). J is taken in blocks of columns written into buffers made once
        # per step: a fresh temporary per operation cost more than the arithmetic (each is a new
        # allocation the kernel has to fault in), and the step holds J, U, the direction and one
        # block's buffers.
        tasks, width = j.shape
        columns = min(COLUMNS, width)
        threshold = torch.rand(width, generator=step.generator, dtype=j.dtype).to(j.device).mul_(2).sub_(1)
        direction = torch.empty(width, dtype=j.dtype, device=j.device)
        scratch = torch.empty(tasks * columns, dtype=j.dtype, device=j.device)
        signed, pos, neg, bound, above, below = (torch.empty(columns, dtype=j.dtype, device=j.device)
                                                 for _ in range(6))
        for start in range(0, width, COLUMNS):
            n = min(COLUMNS, width - start)
            block, out, part = j[:, start:start + n], direction[start:start + n], scratch[:tasks * n].view(tasks, n)
            s, p, q, b, a, c = signed[:n], pos[:n], neg[:n], bound[:n], above[:n], below[:n]
            torch.sum(torch.clamp(block, min=0, out=part), 0, out=p)
            torch.sum(torch.clamp(block, max=0, out=part), 0, out=q)
            torch.add(p, q, out=s)
            torch.sub(p, q, out=b)
            b.mul_(threshold[start:start + n])  # (2U − 1)·Σᵢ|gᵢ|
            # the masks as 0/1 floats (where and masked_fill on bool masks cost ten times more):
            # pos·[P > U] + neg·[P < U] is exactly pos, neg or 0 (P = U keeps nothing)
            torch.gt(s, b, out=a)
            torch.lt(s, b, out=c)
            torch.mul(p, a, out=out).addcmul_(q, c)
            if self.leak != 0.0:  # ℓ Σᵢgᵢ + (1 − ℓ) Σᵢ M_ik g_ik
                out.mul_(1 - self.leak).add_(s, alpha=self.leak)
        return Update(torch.ones_like(step.losses), direction=direction)
