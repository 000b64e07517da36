"""Samplers: which task's data set each training step draws from (multi-input regime)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.core.registry import Registry


class Sampler:
    """Draws a task name per step with probabilities from the task data-set sizes.

    Subclasses implement :meth:`probabilities`; randomness comes from the generator the trainer
    owns (checkpointed with it), so a resumed run draws the same sequence.
    """

    def setup(self, sizes: Mapping[str, int]) -> None:
        if not sizes or any(n < 1 for n in sizes.values()):
            raise InvalidParameterError(f"every task data set must be non-empty; sizes: {dict(sizes)}")
        self.tasks = tuple(sizes)
        self.sizes = dict(sizes)

    def probabilities(self, step: int, total_steps: int) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, generator: torch.Generator, step: int = 0, total_steps: int = 1) -> str:
        p = self.probabilities(step, total_steps)
        return self.tasks[int(torch.multinomial(p, 1, generator=generator))]

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Mapping) -> None:
        """Stateless by default: nothing to restore."""

    def _sizes(self) -> Tensor:
        return torch.tensor([self.sizes[t] for t in self.tasks], dtype=torch.float64)


SAMPLERS: Registry[Sampler] = Registry("sampler")
