"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.core.task import Task
from polytask.models._common import EncoderFactory, last_layer, positive_int, trainable
from polytask.models._experts import ExpertModel
from polytask.models.base import ARCHITECTURES


class _Level(nn.Module):
    """One extraction layer: task-specific and shared experts, task gates, an optional shared gate."""

    def __init__(self, task_experts: dict[str, nn.ModuleList], shared_experts: nn.ModuleList, gate_in: int | None,
                 dim: int, shared_gate: bool) -> None:
        super().__init__()
        self.task_experts = nn.ModuleDict(task_experts)
        self.shared_experts = shared_experts
        n_task, n_shared = len(next(iter(task_experts.values()))), len(shared_experts)
        width = gate_in or dim
        self.task_gates = nn.ModuleDict({t: nn.Linear(width, n_task + n_shared) for t in task_experts})
        self.shared_gate = nn.Linear(width, n_task * len(task_experts) + n_shared) if shared_gate else None
        self.gate_in = gate_in


@ARCHITECTURES.register("ple")
class PLE(ExpertModel):
    """Stacked layers of task-specific and shared experts with progressive gating.

    Progressive Layered Extraction (Tang, Liu, Zhao & Gong, "Progressive Layered Extraction
    (PLE): A Novel Multi-Task Learning (MTL) Model for Personalized Recommendations", RecSys 2020).

    Each of ``levels`` extraction layers j has ``num_task_experts`` experts per task and
    ``num_shared_experts`` shared experts. Task k's gate mixes its own and the shared experts,
    g^{k,j} = softmax(W^{k,j} g^{k,j−1}) · [E^{k,j}, E^{s,j}](g^{k,j−1}); below the top layer a
    shared gate mixes all experts into g^{s,j}, the shared experts' next input (eq. 4–6 of the
    paper). Level-1 experts come from ``encoder_factory`` and read x; higher experts are
    Linear(D, D) → ReLU. Towers read g^{k,levels}.

    θ: every parameter that reaches more than one task's loss — the shared experts and shared
    gates, task experts below the top layer (they feed the shared gate) and task gates below
    layer ``levels − 1``. Private to task k: its top-layer experts, its top two gates and its
    tower (for ``levels = 1``, i.e. CGC: all of task k's experts and its gate). z: (batch, T, D).
    """

    architecture = "ple"

    def __init__(self, encoder_factory: EncoderFactory, tasks: Sequence[Task], *, levels: int = 2,
                 num_shared_experts: int = 2, num_task_experts: int = 1, head_hidden: Sequence[int] = (),
                 head_dropout: float = 0.0) -> None:
        super().__init__(tasks, head_hidden, head_dropout)
        positive_int(levels, "levels", self.architecture)
        positive_int(num_task_experts, "num_task_experts", self.architecture)
        shared, dim, gate_in = self._experts(encoder_factory, num_shared_experts, "num_shared_experts")
        first_task = {t: self._experts(encoder_factory, num_task_experts, "num_task_experts") for t in self.task_names}
        self.gate_in = gate_in
        layers = [_Level({t: e[0] for t, e in first_task.items()}, shared, gate_in, dim, levels > 1)]
        for j in range(1, levels):
            layers.append(_Level({t: self._dense(num_task_experts, dim) for t in self.task_names},
                                 self._dense(num_shared_experts, dim), dim, dim, j < levels - 1))
        self.levels = nn.ModuleList(layers)
        self._towers(dim)

    @staticmethod
    def _dense(count: int, dim: int) -> nn.ModuleList:
        return nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.ReLU()) for _ in range(count))

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        task_in = {t: x for t in self.task_names}
        shared_in = x
        dim = self.representation_dim
        for level in self.levels:
            shared_out = self._run(level.shared_experts, shared_in, dim, self.architecture)
            task_out = {t: self._run(level.task_experts[t], task_in[t], dim, self.architecture) for t in self.task_names}
            nxt = {}
            for t in self.task_names:
                chosen = torch.cat([task_out[t], shared_out], dim=1)
                gate = torch.softmax(level.task_gates[t](self._gate_input(task_in[t], chosen, level.gate_in)), dim=-1)
                nxt[t] = self.mix(gate, chosen)
            if level.shared_gate is not None:
                everything = torch.cat([*task_out.values(), shared_out], dim=1)
                gate = torch.softmax(level.shared_gate(self._gate_input(shared_in, everything, level.gate_in)), dim=-1)
                shared_in = self.mix(gate, everything)
            task_in = nxt
        return torch.stack([task_in[t] for t in self.task_names], dim=1)

    def _private_modules(self, name: str) -> list[nn.Module]:
        top = self.levels[-1]
        mods: list[nn.Module] = [top.task_experts[name], top.task_gates[name], self.heads[name]]
        if len(self.levels) > 1:
            mods.append(self.levels[-2].task_gates[name])
        return mods

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        for module in self._private_modules(name):
            yield from module.parameters()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        private = {id(p) for t in self.task_names for m in self._private_modules(t) for p in m.parameters()}
        return iter(trainable(p for p in self.parameters() if id(p) not in private))

    def last_shared_parameters(self) -> list[nn.Parameter]:
        top = self.levels[-1]
        return [p for e in top.shared_experts for p in last_layer(e)]


@ARCHITECTURES.register("cgc")
class CGC(PLE):
    """Customized Gate Control: single-layer PLE (Tang et al., RecSys 2020, section 4.2).

    Task k's tower reads softmax(Wₖ x) · [Eₖ(x), E_s(x)]: its own experts and the shared ones.
    θ: the shared experts; private to task k: its experts, its gate and its tower. z: (batch, T, D).
    """

    architecture = "cgc"

    def __init__(self, encoder_factory: EncoderFactory, tasks: Sequence[Task], *, num_shared_experts: int = 2,
                 num_task_experts: int = 1, head_hidden: Sequence[int] = (), head_dropout: float = 0.0) -> None:
        super().__init__(encoder_factory, tasks, levels=1, num_shared_experts=num_shared_experts,
                         num_task_experts=num_task_experts, head_hidden=head_hidden, head_dropout=head_dropout)
