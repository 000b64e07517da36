"""The contract every multi-task environment family meets.

A family holds one environment per task and steps them together: the agent sees a (T, obs_dim)
array of observations, answers with a (T, act_dim) array of actions in [-1, 1] (each family
rescales to its own action range), and gets per-task rewards back. Every task's episode has the
same fixed length, ``max_episode_steps``, so all tasks reach an episode boundary at the same
step: that is where a run may checkpoint and resume exactly (each episode's reset seed is a pure
function of the run's seed, the task and the episode's index, so nothing about an environment
has to be saved).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StepResult:
    """What one lockstep step returns; every array has the task axis first (length T)."""

    obs: np.ndarray  # (T, obs_dim) float32: the observation after the step
    reward: np.ndarray  # (T,) float32
    terminated: np.ndarray  # (T,) bool: a terminal state (no bootstrapping from it)
    truncated: np.ndarray  # (T,) bool: the episode hit max_episode_steps
    success: np.ndarray  # (T,) float32: 1.0 / 0.0 at this step, NaN where the family defines none


class MultiTaskEnv(abc.ABC):
    """T tasks, one environment each, stepped in lockstep with fixed-length episodes."""

    #: The tasks' names, in the order of the task axis.
    task_names: tuple[str, ...]
    #: A sentence per task describing it, for context embeddings (CARE).
    descriptions: dict[str, str]
    obs_dim: int
    act_dim: int
    max_episode_steps: int

    @abc.abstractmethod
    def reset(self, seeds: list[int]) -> np.ndarray:
        """Start a new episode in every task, task i seeded with ``seeds[i]``; (T, obs_dim)."""

    @abc.abstractmethod
    def step(self, actions: np.ndarray) -> StepResult:
        """Apply a (T, act_dim) array of actions in [-1, 1]. The caller resets after truncation."""

    def close(self) -> None:  # noqa: B027 - families without resources need no cleanup
        """Release the environments' resources."""

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)
