"""Learning to Branch: one column per task, each stage reading one parent chosen by Gumbel-softmax."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.core.task import Task
from polytask.models._common import EncoderFactory, last_layer, make_encoder, task_heads, trainable
from polytask.models.base import ARCHITECTURES, MultiTaskModel
from polytask.models.cross_stitch import encoder_stages


def _count(value: object, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidParameterError(f"`{name}` of `ltb` must be an int >= 0 (training steps); found {value!r}")
    return value


@ARCHITECTURES.register("ltb")
class LTB(MultiTaskModel):
    """Learning to Branch — Guo, Lee & Ulbricht, "Learning to Branch for Multi-Task Learning",
    ICML 2020, as LibMTL's ``LTB`` implements it on per-task encoder columns.

    One column (a fresh encoder, cut into its ``stages()``) per task. Stage 0 of every column reads
    the input; stage l ≥ 1 of column i reads one parent, the stage l − 1 output of column j, chosen by
    a learned distribution over j: logits αˡᵢⱼ (a T×T matrix per stage transition, from 0):

        xᵢˡ = stageˡᵢ(Σⱼ sᵢⱼˡ xⱼˡ⁻¹),   sᵢˡ = GumbelSoftmax(αᵢˡ, τ, hard)   (one-hot, straight-through)

    so gradients train α and the columns together (the search). Tasks whose columns pick the same
    parents share those layers: the learned tree. Schedule, in training steps (forward passes in
    training mode, a buffer, so a resumed run continues it): the first ``warmup_steps`` mix every
    parent uniformly (sᵢⱼ = 1/T); then the search samples with τ = ``tau``/√(1 + k/``decay_steps``)
    (LibMTL: τ decays as 1/√epoch); after ``search_steps`` the tree is fixed to argmax α and only the
    column stages some task still uses are computed. Evaluation always uses the argmax tree.

    θ: every column and every α. z: the final column outputs stacked as (batch, T, D), task order
    = ``task_names``.

    Departures: the warm-up averages the parents (LibMTL sums them, multiplying the stage's input by
    T); the schedule is in steps, not epochs, since an architecture is not told the epoch; the
    paper's search also penalises the number of branches, which LibMTL and this module do not.
    """

    shares_representation = False  # each task reads its own column's output

    def __init__(self, encoder_factory: EncoderFactory, tasks: Sequence[Task], *, warmup_steps: int = 0,
                 search_steps: int = 1000, tau: float = 1.0, decay_steps: int = 100, head_hidden: Sequence[int] = (),
                 head_dropout: float = 0.0) -> None:
        super().__init__(tasks)
        self.warmup_steps = _count(warmup_steps, "warmup_steps")
        self.search_steps = _count(search_steps, "search_steps")
        if self.search_steps < self.warmup_steps:
            raise InvalidParameterError(f"`search_steps` of `ltb` ({search_steps}) must be >= `warmup_steps` "
                                        f"({warmup_steps}): the search follows the warm-up")
        if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and tau > 0):
            raise InvalidParameterError(f"`tau` of `ltb` must be > 0; found {tau!r}")
        self.tau = float(tau)
        if _count(decay_steps, "decay_steps") < 1:
            raise InvalidParameterError(f"`decay_steps` of `ltb` must be >= 1; found {decay_steps!r}")
        self.decay_steps = decay_steps
        columns, widths = zip(*(make_encoder(encoder_factory, "ltb", "column") for _ in tasks), strict=True)
        self.columns = nn.ModuleList(columns)
        self._stages = [encoder_stages(c) for c in columns]
        n_tasks, n_stages = len(columns), len(self._stages[0])
        self.alphas = nn.Parameter(torch.zeros(max(n_stages - 1, 0), n_tasks, n_tasks))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.representation_dim = widths[0]
        self.heads = task_heads(tasks, widths[0], head_hidden, head_dropout)

    def phase(self) -> str:
        """``warmup``, ``search`` or ``fixed`` (the argmax tree), for the current step in training mode."""
        if not self.training:  # before reading the step buffer: tracing for export must not branch on its value
            return "fixed"
        k = int(self.steps)
        if k >= self.search_steps:
            return "fixed"
        return "warmup" if k < self.warmup_steps else "search"

    def branches(self) -> list[list[int]]:
        """The argmax tree: for every stage transition l ≥ 1, the parent column of each column."""
        return self.alphas.argmax(dim=-1).tolist()

    def encode(self, x: Tensor, task: str | None = None) -> Tensor:
        phase, n = self.phase(), len(self.columns)
        if self.training:
            self.steps += 1
        if phase == "fixed":
            return self._stack(self._fixed(x))
        outs = [stages[0](x) for stages in self._stages]
        for level in range(1, len(self._stages[0])):
            if phase == "warmup":
                select = torch.full((n, n), 1.0 / n, device=x.device)
            else:
                k = int(self.steps) - 1 - self.warmup_steps
                select = F.gumbel_softmax(self.alphas[level - 1], tau=self.tau / (1 + k / self.decay_steps) ** 0.5,
                                          hard=True, dim=-1)
            stacked = torch.stack(outs, dim=1)  # (B, T, ...)
            mixed = torch.einsum("ij,bj...->bi...", select.to(stacked.dtype), stacked)
            outs = [stages[level](xi) for stages, xi in zip(self._stages, mixed.unbind(1), strict=True)]
        return self._stack(outs)

    def _fixed(self, x: Tensor) -> list[Tensor]:
        n_stages, n = len(self._stages[0]), len(self.columns)
        parents = self.branches()
        needed = [set(range(n)) for _ in range(n_stages)]  # columns whose stage-l output some task uses
        for level in range(n_stages - 1, 0, -1):
            needed[level - 1] = {parents[level - 1][i] for i in needed[level]}
        outs: dict[int, Tensor] = {i: self._stages[i][0](x) for i in sorted(needed[0])}
        for level in range(1, n_stages):
            outs = {i: self._stages[i][level](outs[parents[level - 1][i]]) for i in sorted(needed[level])}
        return [outs[i] for i in range(n)]

    def _stack(self, outs: list[Tensor]) -> Tensor:
        z = torch.stack(outs, dim=1)
        if z.dim() != 3 or z.shape[2] != self.representation_dim:
            raise ShapeError(f"ltb columns returned {tuple(z.shape[:1] + z.shape[2:])} per task; "
                             f"expected (batch, {self.representation_dim})")
        return z

    def decode(self, z: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        names = self.task_names if tasks is None else tasks
        return {t: self.tasks[t].prepare_prediction(self.heads[t](z[:, self.task_names.index(t)])) for t in names}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return iter(trainable([*self.columns.parameters(), self.alphas]))

    def last_shared_parameters(self) -> list[nn.Parameter]:
        return [p for c in self.columns for p in last_layer(c)]

    def task_parameters(self, name: str) -> Iterator[nn.Parameter]:
        yield from self.heads[name].parameters()
