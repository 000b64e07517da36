"""Multi-gate mixture-of-experts (MMoE)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.core.task import Task
from polytask.models._common import EncoderFactory
from polytask.models._experts import GatedExperts
from polytask.models.base import ARCHITECTURES


@ARCHITECTURES.register("mmoe")
class MMoE(GatedExperts):
    """Shared experts mixed by one softmax gate per task.

    Multi-gate Mixture-of-Experts (Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships
    in Multi-task Learning with Multi-gate Mixture-of-Experts", KDD 2018).

    n experts fₑ shared by all tasks, one softmax gate per task:
    yₜ = hₜ(Σₑ gₜ(x)ₑ fₑ(x)), gₜ(x) = softmax(Wₜ x)  (eq. 5–6 of the paper).

    θ: the experts. Private to task t: its gate Wₜ and tower hₜ. z: (batch, T, D), row t the
    gated mixture task t's tower reads (see :class:`ExpertModel`).
    """

    architecture = "mmoe"

    def __init__(self, encoder_factory: EncoderFactory, tasks: Sequence[Task], *, num_experts: int = 4,
                 head_hidden: Sequence[int] = (), head_dropout: float = 0.0) -> None:
        super().__init__(tasks, head_hidden, head_dropout)
        self.experts, dim, self.gate_in = self._experts(encoder_factory, num_experts)
        self.gates = nn.ModuleDict({t: nn.Linear(self.gate_in or dim, num_experts) for t in self.task_names})
        self._towers(dim)

    def mixing(self, task: str, gate_input: Tensor) -> Tensor:
        return torch.softmax(self.gates[task](gate_input), dim=-1)
