"""Random Loss Weighting (RLW)."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.methods._weighting import PerTaskMethod, as_weights, softmax
from polytask.methods.base import HostUpdate, Step, register, stream

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

    The engine's own step takes :meth:`host_update` where every task is active: the block's 64
    weight vectors are made as tensors of the losses' dtype and device once, with their values as
    floats, and a step hands over a copy of its row (the same values as :meth:`weights`): a copy
    costs less than making a tensor from floats (5–8 µs inside a small model's step), and the
    engine reads nothing back.
    """

    needs = "losses"
    stateful = True  # a random draw per step

    def __init__(self) -> None:
        super().__init__()
        self._remember()

    def weights(self, step: Step) -> Tensor:
        draws, weights, _ = self._draws(step)
        if weights is not None and self.all_active(step):
            return as_weights(weights, step)
        active = [draws[r] for r in self.positions(step)]  # T numbers: host arithmetic (see PerTaskMethod)
        return as_weights([len(active) * w for w in softmax(active)], step)

    def host_update(self, step: Step) -> HostUpdate | None:
        """The step's weights from the block's tensors (see the class); None (:meth:`weights`) for a
        step with a generator of its own or with some tasks inactive."""
        if step.has_generator or not self.all_active(step):
            return None
        block, row = divmod(step.index, BLOCK)
        like = step.losses
        key = (step.seed, block, len(self.all_tasks), like.dtype, like.device)
        kept = self.__dict__.get("_block_tensors")  # a memo, as `_block`
        if kept is None or kept[0] != key:
            # the block's weights, rounded to the dtype as `weights` rounds them (a C cast from double)
            weights = torch.tensor(self._draws(step)[2], dtype=like.dtype)
            kept = self.__dict__["_block_tensors"] = (key, weights.to(like.device).unbind(), weights.tolist())
        return HostUpdate(kept[1][row].clone(), values=kept[2][row])  # a copy: HostUpdate.weights are the step's own

    def _draws(self, step: Step) -> tuple[list[float], list[float] | None, list[list[float]] | None]:
        """The step's draw z for every task of ``setup``, T · softmax(z) where it comes from a block
        (computed for the block at once: the weights of a step with every task active) and the
        block's rows of those weights."""
        count = len(self.all_tasks)
        if step.has_generator:
            return torch.randn(count, generator=step.generator, dtype=torch.float64).tolist(), None, None
        block, row = divmod(step.index, BLOCK)
        key = (step.seed, block, count)
        kept = self.__dict__.get("_block")  # a memo of a pure function of the key: no state to save
        if kept is None or kept[0] != key:
            draws = torch.randn(BLOCK, count, generator=stream(step.seed, -1 - block), dtype=torch.float64)
            kept = self.__dict__["_block"] = (key, draws.tolist(), (count * torch.softmax(draws, dim=1)).tolist())
        return kept[1][row], kept[2][row], kept[2]
