"""GradDrop: per coordinate, keep only the task gradients of one randomly chosen sign."""

from __future__ import annotations

import torch

from polytask.core.errors import InvalidParameterError
from polytask.methods.base import Method, Step, Update, register

#: columns of J per block (2.6 MB of float32 at T = 10)
COLUMNS = 1 << 16
#: the same on CUDA, where a block's operations are kernel launches and the caching allocator makes
#: buffers free: 16 times wider (a 1.75 M-parameter MLP is 2 blocks instead of 27)
CUDA_COLUMNS = 1 << 20


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

        The sum of a coordinate's negative gradients is taken as Σᵢgᵢ − Σᵢ max(gᵢ, 0): Algorithm 1's
        masked sum to round-off (not bit for bit where the negative ones are kept), for one pass over
        J fewer (on the CPU the method went from 37 to 26 ms a step at T = 10, P = 1.85 M).

        On CUDA, U is drawn on the device, by a generator seeded with one draw from the step's
        stream: a step draws the same U on every run, resume and rank, but not the numbers the
        CPU draws for it. Drawing the P uniforms on the host and copying them was about two thirds
        of a step on an H200 (26 ms against 9 for the task Jacobian, MLP of 1.75 M parameters).
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
        # ones (P < U): with pos = Σᵢ max(gᵢ, 0) and neg = Σᵢgᵢ − pos (the sum of the negative ones),
        # Σᵢgᵢ = pos + neg and Σᵢ|gᵢ| = pos − neg, so P > U  ⇔  Σᵢgᵢ > (2U − 1)(pos − neg): no division
        # is needed (an all-zero column keeps nothing either way). J is taken in blocks of columns
        # written into buffers made once per step: a fresh temporary per operation cost more than
        # the arithmetic, and a block stays in cache through its operations.
        tasks, width = j.shape
        block_columns = CUDA_COLUMNS if j.is_cuda else COLUMNS
        columns = min(block_columns, width)
        # On the CPU U is drawn block by block, into one buffer: the CPU generator gives the numbers
        # in sequence, so they are those of one draw of all P (a P-long U, written and read again,
        # was a tenth of the method's time). On CUDA all at once, from the device (see uniforms).
        whole = uniforms(width, step.generator, j) if j.is_cuda else None
        direction = torch.empty(width, dtype=j.dtype, device=j.device)
        scratch = torch.empty(tasks * columns, dtype=j.dtype, device=j.device)
        drawn, signed, pos, neg, bound, above, below = (torch.empty(columns, dtype=j.dtype, device=j.device)
                                                        for _ in range(7))
        for start in range(0, width, block_columns):
            n = min(block_columns, width - start)
            block, out, part = j[:, start:start + n], direction[start:start + n], scratch[:tasks * n].view(tasks, n)
            s, p, q, b, a, c = signed[:n], pos[:n], neg[:n], bound[:n], above[:n], below[:n]
            u = (whole[start:start + n] if whole is not None
                 else torch.rand(n, generator=step.generator, dtype=j.dtype, out=drawn[:n]))
            torch.sum(torch.clamp(block, min=0, out=part), 0, out=p)
            torch.sum(block, 0, out=s)
            torch.sub(s, p, out=q)  # neg, to round-off: one pass over the block fewer than its own clamp and sum
            torch.sub(p, q, out=b)
            b.mul_(u.mul_(2).sub_(1))  # (2U − 1)·Σᵢ|gᵢ|
            # the masks as 0/1 floats (where and masked_fill on bool masks cost ten times more):
            # pos·[P > U] + neg·[P < U] is pos, neg or 0 (P = U keeps nothing)
            torch.gt(s, b, out=a)
            torch.lt(s, b, out=c)
            torch.mul(p, a, out=out).addcmul_(q, c)
            if self.leak != 0.0:  # ℓ Σᵢgᵢ + (1 − ℓ) Σᵢ M_ik g_ik
                out.mul_(1 - self.leak).add_(s, alpha=self.leak)
        return Update(torch.ones_like(step.losses), direction=direction)


def uniforms(n: int, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor:
    """U ~ Uniform(0, 1)ⁿ in ``like``'s dtype and device: from ``generator`` on the CPU; on CUDA from
    a device generator seeded by one draw of ``generator`` (the step's stream; see Departures)."""
    if not like.is_cuda:
        return torch.rand(n, generator=generator, dtype=like.dtype)
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    device_generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.rand(n, generator=device_generator, dtype=like.dtype, device=like.device)
