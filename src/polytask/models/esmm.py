"""Entire Space Multi-task Model (ESMM) for click → conversion funnels."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.task import Task
from polytask.models._common import check_rows, encoder_width
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.heads import make_head

_LOG_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, accurate near 0 and for very negative x (Mächler 2012)."""
    x = x.clamp(max=-1e-7)
    return torch.where(x > _LOG_HALF, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


@ARCHITECTURES.register("esmm")
class ESMM(MultiTaskModel):
    """Click → conversion funnel: task t predicts Π_{i≤t} σ(aᵢ) over all impressions (pCTCVR = pCTR·pCVR).

    Entire Space Multi-task Model (Ma, Zhao, Huang, Wang, Hu, Zhu & Gai, "Entire Space Multi-Task
    Model: An Effective Approach for Estimating Post-Click Conversion Rate", SIGIR 2018).

    Tasks form a funnel in ``task_names`` order (impression → click → conversion): a shared
    encoder (the embeddings) feeds one tower per stage giving the conditional probability of the
    stage given the previous one, and task t predicts the joint probability over the entire space,
    pₜ = Π_{i≤t} σ(aᵢ). With two tasks this is the paper's pCTCVR = pCTR × pCVR, both losses
    (click, click-and-convert) taken on all impressions, so pCVR is learned without the
    sample-selection bias of training on clicks only. Outputs are logits of pₜ (log pₜ − log(1 − pₜ)),
    so each task's ordinary binary cross-entropy is the paper's loss; ``conditional_probabilities``
    gives the towers' σ(aᵢ) (pCTR, pCVR).

    θ: the encoder and every tower but the last (tower i reaches the losses of tasks i..T).
    Private to the last task: its tower; the other tasks have no private parameters. z: the
    encoder output (batch, D).
    """

    def __init__(self, encoder: nn.Module, tasks: Sequence[Task], *, head_hidden: Sequence[int] = (64,),
                 head_dropout: float = 0.0, representation_dim: int | None = None) -> None:
        super().__init__(tasks)
        wrong = [t.name for t in tasks if t.kind != "binary"]
        if wrong:
            raise InvalidParameterError(f"`esmm` chains binary tasks (click → conversion); task(s) {wrong} are not binary")
        dim = encoder_width(encoder, "esmm", representation_dim)
        self.encoder = encoder
        self.representation_dim = dim
        self.towers = nn.ModuleDict({t.name: make_head(dim, 1, head_hidden, head_dropout) for t in tasks})

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        return check_rows(self.encoder(x), self.representation_dim, f"encoder {type(self.encoder).__name__}")

    def conditional_logits(self, z: Tensor) -> dict[str, Tensor]:
        return {t: self.towers[t](z).squeeze(1) for t in self.task_names}

    def conditional_probabilities(self, x: Tensor) -> dict[str, Tensor]:
        """σ(aₜ): each stage's probability given the previous stage (pCTR, pCVR)."""
        return {t: torch.sigmoid(a) for t, a in self.conditional_logits(self.encode(x)).items()}

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        last = max(self.task_names.index(t) for t in names) if names else -1
        out: dict[str, Tensor] = {}
        log_p: Tensor | None = None
        for t in self.task_names[:last + 1]:
            a = self.towers[t](z).squeeze(1)
            if log_p is None:
                log_p, logit = F.logsigmoid(a), a
            else:
                log_p = log_p + F.logsigmoid(a)
                logit = log_p - log1mexp(log_p)
            if t in names:
                out[t] = self.tasks[t].prepare_prediction(logit)
        return {t: out[t] for t in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        yield from (p for p in self.encoder.parameters() if p.requires_grad)
        for t in self.task_names[:-1]:
            yield from (p for p in self.towers[t].parameters() if p.requires_grad)

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        if name == self.task_names[-1]:
            yield from self.towers[name].parameters()
