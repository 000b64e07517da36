"""Soft parameter sharing: one network per task, tied by a penalty on their parameter distance."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.task import Task
from polytask.models._common import EncoderFactory, check_rows, last_layer, make_encoder, task_heads, trainable
from polytask.models.base import ARCHITECTURES, MultiTaskModel

DISTANCES = ("pairwise", "mean")


@ARCHITECTURES.register("soft_sharing")
class SoftSharing(MultiTaskModel):
    """One network per task, tied by an L2 penalty between their parameters.

    One tower (a fresh encoder) per task, with an L2 penalty between corresponding parameters
    (Duong et al., "Low Resource Dependency Parsing: Cross-lingual Parameter Sharing in a Neural
    Network Parser", ACL 2015; Yang & Hospedales, "Trace Norm Regularised Deep Multi-Task
    Learning", ICLR workshop 2017, use the same towers with a trace-norm tie instead).

    ``extra_loss`` = λ Σ_{i<j} ‖θᵢ − θⱼ‖² (``distance="pairwise"``) or λ Σᵢ ‖θᵢ − θ̄‖²
    (``distance="mean"``, θ̄ the towers' mean; equal to the pairwise sum divided by T), summed over
    every pair of corresponding parameters of the towers; λ = ``strength``.

    θ for the engine: the towers. No parameter reaches two task losses here, so the task
    gradients live on disjoint blocks of θ and the Gramian is diagonal: Gramian methods then only
    rescale tasks (MGDA → weights ∝ 1/‖gᵢ‖², PCGrad finds no conflict). The towers interact
    through the penalty alone, which the engine adds with weight 1. z is the towers' outputs
    stacked as (batch, T, D), task order = ``task_names``.
    """

    shares_representation = False  # each task reads its own slice of z

    def __init__(self, encoder_factory: EncoderFactory, tasks: Sequence[Task], *, strength: float = 1e-3,
                 distance: str = "pairwise", head_hidden: Sequence[int] = (), head_dropout: float = 0.0) -> None:
        super().__init__(tasks)
        if not isinstance(strength, (int, float)) or not strength >= 0:
            raise InvalidParameterError(f"`strength` of `soft_sharing` must be >= 0; found {strength!r}")
        if distance not in DISTANCES:
            raise InvalidParameterError(f"`distance` of `soft_sharing` must be one of {', '.join(DISTANCES)}; found {distance!r}")
        towers, widths = zip(*(make_encoder(encoder_factory, "soft_sharing", "tower") for _ in tasks), strict=True)
        shapes = [[p.shape for p in t.parameters()] for t in towers]
        if any(s != shapes[0] for s in shapes):
            raise InvalidParameterError("`encoder_factory` of `soft_sharing` must build towers of identical shapes")
        self.towers = nn.ModuleDict(dict(zip(self.task_names, towers, strict=True)))
        self.representation_dim = widths[0]
        self.strength = float(strength)
        self.distance = distance
        self.heads = task_heads(tasks, widths[0], head_hidden, head_dropout)

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        outs = [check_rows(self.towers[t](x), self.representation_dim, f"tower of task '{t}'") for t in self.task_names]
        return torch.stack(outs, dim=1)

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        return {t: self.tasks[t].prepare_prediction(self.heads[t](z[:, self.task_names.index(t)])) for t in names}

    def penalty(self) -> Tensor:
        """Σ over corresponding parameters of Σ_{i<j} ‖θᵢ − θⱼ‖² (÷T for ``mean``), without λ."""
        towers = list(self.towers.values())
        first = next(towers[0].parameters(), None)
        total = torch.zeros((), device=first.device if first is not None else None)
        for a, b in itertools.combinations(towers, 2):
            for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
                total = total + (pa - pb).pow(2).sum()
        return total / len(towers) if self.distance == "mean" else total

    def extra_loss(self) -> Tensor | None:
        if self.strength == 0 or len(self.towers) < 2:
            return None
        return self.strength * self.penalty()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(trainable(self.towers.parameters()))

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for tower in self.towers.values() for p in last_layer(tower)]

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.heads[name].parameters()
