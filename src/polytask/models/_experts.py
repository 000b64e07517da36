"""What the mixture-of-experts architectures (MMoE, CGC/PLE, DSelect-k) share: experts made by
an encoder factory, what gates read, per-task towers on a stacked (batch, T, D) representation."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.core.task import Task
from polytask.models._common import EncoderFactory, check_rows, last_layer, make_encoder, positive_int, task_heads, trainable
from polytask.models.base import MultiTaskModel


class ExpertModel(MultiTaskModel):
    """Base of the expert architectures.

    Gates read the input itself, flattened, when the experts are flat-vector encoders (they have
    an int ``in_features``, as ``mlp`` does: the MMoE paper's setting); for other inputs (images,
    token ids, categorical codes) they read the mean of the expert outputs, the only input-sized
    vector available to every encoder.

    ``encode`` returns z = the per-task gated representations stacked as (batch, T, D), in the
    order of ``task_names``: one tensor that every task's tower reads its row of, so the engine's
    ``features`` mode has a single shared representation. Its task-gradient Gramian is diagonal
    (task i's loss only reads row i); the coupling between tasks lives in θ (the experts).
    """

    shares_representation = False  # each task reads its own slice of z

    architecture = "experts"

    def __init__(self, tasks: Sequence[Task], head_hidden: Sequence[int], head_dropout: float) -> None:
        super().__init__(tasks)
        self._head_hidden, self._head_dropout = tuple(head_hidden), head_dropout

    def _experts(self, factory: EncoderFactory, count: int, what: str = "num_experts") -> tuple[nn.ModuleList, int, int | None]:
        positive_int(count, what, self.architecture)
        made = [make_encoder(factory, self.architecture, "expert") for _ in range(count)]
        widths = {w for _, w in made}
        if len(widths) != 1:
            raise ValueError(f"experts of `{self.architecture}` disagree on their output width: {sorted(widths)}")
        gate_in = getattr(made[0][0], "in_features", None)
        return nn.ModuleList(m for m, _ in made), made[0][1], gate_in if isinstance(gate_in, int) else None

    def _towers(self, dim: int) -> None:
        self.representation_dim = dim
        self.heads = task_heads(list(self.tasks.values()), dim, self._head_hidden, self._head_dropout)

    def _gate_input(self, x: Tensor, expert_outputs: Tensor, gate_in: int | None) -> Tensor:
        if gate_in is not None and x.is_floating_point() and x[0].numel() == gate_in:
            return x.flatten(1)
        return expert_outputs.mean(dim=1)

    @staticmethod
    def _run(experts: nn.ModuleList, x: Tensor, dim: int, who: str) -> Tensor:
        """Expert outputs stacked as (batch, E, D)."""
        return torch.stack([check_rows(e(x), dim, f"{who} expert {i}") for i, e in enumerate(experts)], dim=1)

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        return {t: self.tasks[t].prepare_prediction(self.heads[t](z[:, self.task_names.index(t)])) for t in names}

    @staticmethod
    def mix(gates: Tensor, experts: Tensor) -> Tensor:
        """Σₑ gates[b, e] · experts[b, e, :] → (batch, D)."""
        return torch.einsum("be,bed->bd", gates, experts)


class GatedExperts(ExpertModel):
    """One pool of shared experts, one gate per task (MMoE, DSelect-k): subclasses build
    ``self.experts``, ``self.gates`` and say how a gate's output becomes mixing weights."""

    gates: nn.ModuleDict
    experts: nn.ModuleList
    gate_in: int | None

    def mixing(self, task: str, gate_input: Tensor) -> Tensor:
        """(batch, n) weights over the experts for ``task``; rows sum to 1."""
        return self.gates[task](gate_input)

    def gate_weights(self, x: Tensor, expert_outputs: Tensor | None = None) -> dict[str, Tensor]:
        """Each task's gate distribution over the experts, (batch, n) rows summing to 1."""
        outs = self._run(self.experts, x, self.representation_dim, self.architecture) if expert_outputs is None \
            else expert_outputs
        g_in = self._gate_input(x, outs, self.gate_in)
        return {t: self.mixing(t, g_in) for t in self.task_names}

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        outs = self._run(self.experts, x, self.representation_dim, self.architecture)
        gates = self.gate_weights(x, outs)
        return torch.stack([self.mix(gates[t], outs) for t in self.task_names], dim=1)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(trainable(self.experts.parameters()))

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for e in self.experts for p in last_layer(e)]

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.gates[name].parameters()
        yield from self.heads[name].parameters()
