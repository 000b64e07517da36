"""DSelect-k: mixture of experts with differentiable, sparse (k-of-n) per-task gates."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.task import Task
from polytask.models._common import EncoderFactory, positive_int
from polytask.models._experts import GatedExperts
from polytask.models.base import ARCHITECTURES


def smooth_step(t: Tensor, gamma: float) -> Tensor:
    """S(t) = 0 for t ≤ −γ/2, 1 for t ≥ γ/2, −2t³/γ³ + 3t/(2γ) + 1/2 between (Hazimeh et al., eq. 2):
    continuously differentiable, and exactly 0 or 1 outside [−γ/2, γ/2], which makes gates sparse."""
    cubic = -2 * t.pow(3) / gamma**3 + 3 * t / (2 * gamma) + 0.5
    return torch.where(t <= -gamma / 2, torch.zeros_like(t), torch.where(t >= gamma / 2, torch.ones_like(t), cubic))


class DSelectGate(nn.Module):
    """One task's per-example DSelect-k gate over ``num_experts`` experts.

    k selectors, each a binary code z⁽ᶜ⁾ = Wᶜ x ∈ ℝᵐ (m = ⌈log₂ n⌉) choosing one expert through
    r(z)ᵢ = Πⱼ (S(zⱼ) if bit j of i is 1 else 1 − S(zⱼ)); the gate is Σ_c softmax(A x)_c r(z⁽ᶜ⁾).
    When n is not a power of two, code i ≥ n selects expert i − n, so the weights still sum to 1.
    """

    def __init__(self, in_features: int, num_experts: int, k: int, gamma: float) -> None:
        super().__init__()
        self.m = max(1, math.ceil(math.log2(num_experts)))
        self.k, self.gamma, self.num_experts = k, gamma, num_experts
        self.codes = nn.Linear(in_features, k * self.m)
        self.mixture = nn.Linear(in_features, k)
        bits = (torch.arange(2**self.m)[:, None] >> torch.arange(self.m)[None, :]) & 1  # (2^m, m)
        self.register_buffer("bits", bits.float(), persistent=False)
        self.register_buffer("fold", torch.arange(2**self.m) % num_experts, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]  # not len(x): a traced or exported graph keeps the batch dimension free
        s = smooth_step(self.codes(x).view(batch, self.k, 1, self.m), self.gamma)  # (B, k, 1, m)
        r = (self.bits * s + (1 - self.bits) * (1 - s)).prod(dim=-1)  # (B, k, 2^m)
        single = torch.zeros(batch, self.k, self.num_experts, device=x.device, dtype=r.dtype)
        single = single.index_add(2, self.fold, r)  # (B, k, n)
        alpha = torch.softmax(self.mixture(x), dim=-1)  # (B, k)
        return torch.einsum("bk,bkn->bn", alpha, single)


@ARCHITECTURES.register("dselect_k")
class DSelectK(GatedExperts):
    """Shared experts with sparse, differentiable k-of-n per-task gates.

    DSelect-k (Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder,
    Hong & Chi, "DSelect-k: Differentiable Selection in the Mixture of Experts with Applications
    to Multi-Task Learning", NeurIPS 2021): MMoE with each softmax gate replaced by a
    :class:`DSelectGate` that, once trained, puts its weight on at most ``k`` experts.

    yₜ = hₜ(Σₑ gₜ(x)ₑ fₑ(x)). θ: the experts; private to task t: its gate and tower.
    z: (batch, T, D) (see :class:`ExpertModel`). The paper's optional entropy regulariser on
    the selectors is not added.
    """

    architecture = "dselect_k"

    def __init__(self, encoder_factory: EncoderFactory, tasks: Sequence[Task], *, num_experts: int = 4, k: int = 2,
                 gamma: float = 1.0, head_hidden: Sequence[int] = (), head_dropout: float = 0.0) -> None:
        super().__init__(tasks, head_hidden, head_dropout)
        positive_int(k, "k", self.architecture)
        if not isinstance(gamma, (int, float)) or not gamma > 0:
            raise InvalidParameterError(f"`gamma` of `dselect_k` must be > 0; found {gamma!r}")
        if k > num_experts:
            raise InvalidParameterError(f"`k` of `dselect_k` must be <= num_experts ({num_experts}); found {k}")
        self.experts, dim, self.gate_in = self._experts(encoder_factory, num_experts)
        self.gates = nn.ModuleDict({t: DSelectGate(self.gate_in or dim, num_experts, k, float(gamma))
                                    for t in self.task_names})
        self._towers(dim)
