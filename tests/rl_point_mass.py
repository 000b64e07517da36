"""A tiny deterministic multi-task family for the RL tests: a 2-D point mass driven to a goal
that differs per task and is not in the observation (so the tasks conflict for a policy that
cannot tell them apart). Real dynamics and reward, learnable in a few thousand steps."""

from __future__ import annotations

import numpy as np

from polytask.rl.envs.base import MultiTaskEnv, StepResult

GOALS = {"left": (-0.6, 0.0), "right": (0.6, 0.0), "up": (0.0, 0.6), "down": (0.0, -0.6)}


class PointMass(MultiTaskEnv):
    """v' = 0.8 v + 0.2 a, x' = x + 0.5 v'; reward −‖x' − goal‖; success ‖x' − goal‖ < 0.15."""

    obs_dim = 4
    act_dim = 2

    def __init__(self, tasks: tuple[str, ...] = ("left", "right", "up"), max_episode_steps: int = 20) -> None:
        self.task_names = tuple(tasks)
        self.descriptions = {t: f"Move the point to the {t}." for t in tasks}
        self.goals = np.array([GOALS[t] for t in tasks], dtype=np.float64)
        self.max_episode_steps = max_episode_steps
        self.pos = np.zeros((len(tasks), 2))
        self.vel = np.zeros((len(tasks), 2))
        self.t = 0

    def _obs(self) -> np.ndarray:
        return np.concatenate([self.pos, self.vel], axis=1).astype(np.float32)

    def reset(self, seeds: list[int]) -> np.ndarray:
        self.pos = np.stack([np.random.default_rng(s).uniform(-0.3, 0.3, 2) for s in seeds])
        self.vel = np.zeros_like(self.pos)
        self.t = 0
        return self._obs()

    def step(self, actions: np.ndarray) -> StepResult:
        a = np.clip(np.asarray(actions, dtype=np.float64), -1, 1)
        self.vel = 0.8 * self.vel + 0.2 * a
        self.pos = self.pos + 0.5 * self.vel
        self.t += 1
        dist = np.linalg.norm(self.pos - self.goals, axis=1)
        n = len(self.task_names)
        return StepResult(obs=self._obs(), reward=(-dist).astype(np.float32), terminated=np.zeros(n, dtype=bool),
                          truncated=np.full(n, self.t >= self.max_episode_steps), success=(dist < 0.15).astype(np.float32))
