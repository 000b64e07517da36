"""Round-robin sampling: the task data sets in turn, one batch each."""

from __future__ import annotations

import torch
from torch import Tensor

from polytask.data.samplers.base import SAMPLERS, Sampler


@SAMPLERS.register("round_robin")
class RoundRobin(Sampler):
    """Task (s mod T) at training step s: deterministic, every task equally often (pᵢ = 1/T over any T steps).

    The classic multi-task loop (e.g. Collobert & Weston, ICML 2008: "select the next task").
    The position in the cycle is the step index itself, so the sampler keeps no state of its own:
    a run resumed at any step (also mid-epoch, where the trainer replays the epoch's draws)
    continues with the right task. ``probabilities`` is the one-hot distribution of step s.
    """

    def probabilities(self, step: int, total_steps: int) -> Tensor:
        p = torch.zeros(len(self.tasks), dtype=torch.float64)
        p[step % len(self.tasks)] = 1.0
        return p

    def sample(self, generator: torch.Generator, step: int = 0, total_steps: int = 1) -> str:
        return self.tasks[step % len(self.tasks)]

    def __repr__(self) -> str:
        return "RoundRobin()"
