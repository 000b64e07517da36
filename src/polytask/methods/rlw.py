"""Random Loss Weighting (RLW)."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._weighting import PerTaskMethod, as_weights, softmax
from polytask.methods.base import Step, register, stream

#: steps whose draws are made together, by one generator and one ``torch.randn``
BLOCK = 64


@register("rlw")
class RLW(PerTaskMethod):
    """Random Loss Weighting — Lin, Ye, Zhang & Tsang, "Reasonable Effectiveness of Random
    Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022.

        w = T · softmax(z),   z ~ N(0, I_T) drawn afresh every step

    (the paper's normal-distribution variant, scaled so that Σ w = T like equal weighting).
    Every step draws one zⱼ per task of ``setup`` (in that order) and keeps the active tasks', so a
    task's draw does not depend on the order or subset of the step's tasks.

    The draws are a function of the step's ``seed`` and ``index`` alone (so identical on every rank
    and after a resume): step k takes row k mod 64 of ``torch.randn(64, T_setup)`` (float64) drawn
    from ``stream(seed, -1 - k // 64)``, a block of 64 steps' draws made once (negative indices
    of the stream are never a step's). Why: a generator and a ``torch.randn`` every step cost a
    fifth of a tiny model's plain backward (``polytask bench small``). A step given its own
    ``generator`` draws ``torch.randn(T_setup)`` from it instead.
    """

    needs = "losses"
    stateful = True  # a random draw per step

    def __init__(self) -> None:
        super().__init__()
        self._remember()

    def weights(self, step: Step) -> Tensor:
        draws, weights = self._draws(step)
        if weights is not None and self.all_active(step):
            return as_weights(weights, step)
        active = [draws[r] for r in self.positions(step)]  # T numbers: host arithmetic (see PerTaskMethod)
        return as_weights([len(active) * w for w in softmax(active)], step)

    def _draws(self, step: Step) -> tuple[list[float], list[float] | None]:
        """The step's draw z for every task of ``setup``, and T · softmax(z) where it comes from a block
        (computed for the block at once: the weights of a step with every task active)."""
        count = len(self.all_tasks)
        if step.has_generator:
            return torch.randn(count, generator=step.generator, dtype=torch.float64).tolist(), None
        block, row = divmod(step.index, BLOCK)
        key = (step.seed, block, count)
        kept = self.__dict__.get("_block")  # a memo of a pure function of the key: no state to save
        if kept is None or kept[0] != key:
            draws = torch.randn(BLOCK, count, generator=stream(step.seed, -1 - block), dtype=torch.float64)
            kept = self.__dict__["_block"] = (key, draws.tolist(), (count * torch.softmax(draws, dim=1)).tolist())
        return kept[1][row], kept[2][row]
