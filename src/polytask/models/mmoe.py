"""Multi-gate mixture-of-experts (MMoE)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.core.task import Task
from polytask.models._common import EncoderFactory, last_layer, trainable
from polytask.models._experts import ExpertModel
from polytask.models.base import ARCHITECTURES


@ARCHITECTURES.register("mmoe")
class MMoE(ExpertModel):
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

    def gate_weights(self, x: Tensor, expert_outputs: Tensor | None = None) -> dict[str, Tensor]:
        """Each task's gate distribution over the experts, (batch, n) rows summing to 1."""
        outs = self._run(self.experts, x, self.representation_dim, "mmoe") if expert_outputs is None else expert_outputs
        g_in = self._gate_input(x, outs, self.gate_in)
        return {t: torch.softmax(self.gates[t](g_in), dim=-1) for t in self.task_names}

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        outs = self._run(self.experts, x, self.representation_dim, "mmoe")
        gates = self.gate_weights(x, outs)
        return torch.stack([self.mix(gates[t], outs) for t in self.task_names], dim=1)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(trainable(self.experts.parameters()))

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for e in self.experts for p in last_layer(e)]

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.gates[name].parameters()
        yield from self.heads[name].parameters()
