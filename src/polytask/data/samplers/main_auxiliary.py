"""Main/auxiliary sampling: one main task at a fixed rate, auxiliary tasks share the rest."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError, closest
from polytask.data.samplers.base import SAMPLERS, Sampler

AUXILIARY = ("proportional", "uniform")


@SAMPLERS.register("main_auxiliary")
class MainAuxiliary(Sampler):
    """p_main = ρ; pᵢ = (1 − ρ)·nᵢ/Σ_aux nⱼ for auxiliary i (or (1 − ρ)/(T − 1) with ``auxiliary="uniform"``).

    Auxiliary-task learning keeps the task we care about at a fixed share of the updates however
    large the auxiliary data sets are (e.g. Liebel & Körner, "Auxiliary Tasks in Multi-task
    Learning", 2018; Dery et al., "Should We Be Pre-training?", ICLR 2022). ``main`` names the
    task; ``ratio`` = ρ ∈ (0, 1]. With a single task, that task is drawn every step.
    """

    def __init__(self, *, main: str | None = None, ratio: float = 0.5, auxiliary: str = "proportional") -> None:
        if not isinstance(main, str) or not main:
            raise InvalidParameterError(f"`main` of `main_auxiliary` sampler must be the main task's name (required); found {main!r}")
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
            raise InvalidParameterError(f"`ratio` of `main_auxiliary` sampler must be in (0, 1]; found {ratio!r}")
        if auxiliary not in AUXILIARY:
            raise InvalidParameterError(
                f"`auxiliary` of `main_auxiliary` sampler must be one of {', '.join(AUXILIARY)}; "
                f"found {auxiliary!r}.{closest(str(auxiliary), AUXILIARY)}")
        self.main, self.ratio, self.auxiliary = main, float(ratio), auxiliary

    def setup(self, sizes: Mapping[str, int]) -> None:
        super().setup(sizes)
        if self.main not in self.tasks:
            raise InvalidParameterError(
                f"`main` of `main_auxiliary` sampler is '{self.main}', which is not a task.{closest(self.main, self.tasks)} "
                f"Tasks: {', '.join(self.tasks)}")

    def probabilities(self, step: int, total_steps: int) -> Tensor:
        is_main = torch.tensor([t == self.main for t in self.tasks])
        if len(self.tasks) == 1:
            return is_main.double()
        aux = torch.where(is_main, 0.0, self._sizes() if self.auxiliary == "proportional" else 1.0).double()
        return torch.where(is_main, self.ratio, (1.0 - self.ratio) * aux / aux.sum()).double()

    def __repr__(self) -> str:
        return f"MainAuxiliary(main={self.main!r}, ratio={self.ratio}, auxiliary={self.auxiliary!r})"
