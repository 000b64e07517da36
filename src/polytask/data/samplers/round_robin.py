"""Round-robin sampling: the task data sets in turn, one batch each."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.data.samplers.base import SAMPLERS, Sampler


@SAMPLERS.register("round_robin")
class RoundRobin(Sampler):
    """Task (s mod T) at the s-th draw: deterministic, every task equally often (pᵢ = 1/T in the long run).

    The classic multi-task loop (e.g. Collobert & Weston, ICML 2008, alternate over tasks). The
    position in the cycle is the sampler's state (``state_dict``), so a resumed run continues
    with the next task. ``probabilities`` is the one-hot distribution of the next draw.
    """

    def __init__(self) -> None:
        self.position = 0

    def probabilities(self, step: int, total_steps: int) -> Tensor:
        p = torch.zeros(len(self.tasks), dtype=torch.float64)
        p[self.position % len(self.tasks)] = 1.0
        return p

    def sample(self, generator: torch.Generator, step: int = 0, total_steps: int = 1) -> str:
        task = self.tasks[self.position % len(self.tasks)]
        self.position += 1
        return task

    def state_dict(self) -> dict:
        return {"position": int(self.position)}

    def load_state_dict(self, state: Mapping) -> None:
        position = state.get("position", 0)
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise InvalidParameterError(f"`position` of `round_robin` sampler state must be an int >= 0; found {position!r}")
        self.position = position

    def __repr__(self) -> str:
        return "RoundRobin()"
