"""The cheap family: gymnasium's Pendulum swing-up with different gravity, mass and length per task."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from polytask.core.errors import require
from polytask.rl.envs.base import MultiTaskEnv, StepResult
from polytask.rl.envs.checks import check_actions, check_seeds, select_tasks

EXTRA = "rl"


@dataclass(frozen=True)
class PendulumPhysics:
    """One task's physical constants: gravity g (m/s²), tip mass m (kg), rod length l (m)."""

    gravity: float
    mass: float
    length: float
    description: str


#: The tasks, in the order of the task axis. Gymnasium's Pendulum-v1 integrates
#: θ̇ ← θ̇ + (3g/(2l)·sin θ + 3/(m l²)·u)·dt with u ∈ [-2, 2] N·m, so the variants change how hard
#: gravity pulls against how much the motor can accelerate the rod (g/l against 1/(m l²)): the
#: swing-up (pump energy, then balance) is the same skill, its timing and gains are not.
TASKS: dict[str, PendulumPhysics] = {
    "pendulum_g10": PendulumPhysics(
        10.0, 1.0, 1.0, "A standard pendulum under Earth's gravity; swing it up and balance it upright."),
    "pendulum_low_gravity": PendulumPhysics(
        6.0, 1.0, 1.0, "Weak gravity, well below Earth's, lets the pendulum fall slowly; swing it up and balance it upright."),
    "pendulum_high_gravity": PendulumPhysics(
        14.0, 1.0, 1.0, "Strong gravity, well above Earth's, makes the pendulum fall fast; swing it up and balance it upright."),
    "pendulum_heavy": PendulumPhysics(
        10.0, 1.5, 1.0, "A heavy weight at the tip makes the pendulum slow to accelerate with the motor; swing it up and "
        "balance it upright."),
    "pendulum_long": PendulumPhysics(
        10.0, 1.0, 1.4, "A long rod makes the pendulum swing slowly and need more torque to lift; swing it up and balance "
        "it upright."),
    "pendulum_short": PendulumPhysics(
        10.0, 1.0, 0.7, "A short rod makes the pendulum swing quickly and easy to lift; swing it up and balance it upright."),
}

EPISODE_STEPS = 200  # Pendulum-v1's TimeLimit
UPRIGHT_ANGLE = 0.3  # rad (about 17°) from vertical
HOLD_STEPS = 50  # 2.5 s at dt = 0.05


class PendulumFamily(MultiTaskEnv):
    """Pendulum swing-up (gymnasium ``Pendulum-v1``) under different physics per task, in lockstep.

    Every task is gymnasium's ``PendulumEnv`` (the classic swing-up of OpenAI Gym, Brockman et
    al. 2016) with its own gravity g, mass m and length l (:data:`TASKS`; the contexts of CARL,
    Benjamins et al., "Contextualize Me — The Case for Context in Reinforcement Learning", TMLR
    2023, vary the same three). Observation (cos θ, sin θ, θ̇), 3-d and the same meaning in every
    task, so a policy that does not know the task cannot tell the physics apart from one state;
    action a ∈ [-1, 1] → torque u = 2a N·m; reward −(θ² + 0.1 θ̇² + 0.001 u²) (Pendulum-v1's,
    θ normalised to [-π, π], 0 upright); 200-step episodes, never terminated early.

    Success at a step: the pendulum has been upright, |θ| ≤ 0.3 rad, for each of the last 50
    steps (2.5 s) — a swing through the top does not count, balancing does.

    Departures
    ----------
    - The environments are ``PendulumEnv`` instances without gymnasium's wrappers
      (``TimeLimit``, the order and passive checkers): the family counts the 200 steps itself,
      as the contract needs every task truncated at the same step.
    """

    max_episode_steps = EPISODE_STEPS
    obs_dim = 3
    act_dim = 1

    def __init__(self, *, tasks: Sequence[str] | None = None) -> None:
        self.task_names = select_tasks("pendulum", tasks, TASKS)
        require("gymnasium", EXTRA)
        from gymnasium.envs.classic_control import pendulum as gym_pendulum

        self.descriptions = {name: TASKS[name].description for name in self.task_names}
        self.physics = {name: TASKS[name] for name in self.task_names}
        self._envs = []
        for name in self.task_names:
            physics = TASKS[name]
            env = gym_pendulum.PendulumEnv(g=physics.gravity)
            env.m, env.l = physics.mass, physics.length  # read by step(); the constructor takes only g
            self._envs.append(env)
        self.max_torque = float(self._envs[0].max_torque)
        self._steps: int | None = None  # steps into the episode; None before the first reset
        self._upright = np.zeros(len(self.task_names), dtype=np.int64)

    def reset(self, seeds: list[int]) -> np.ndarray:
        seeds = check_seeds("the pendulum family", self.num_tasks, seeds)
        obs = [env.reset(seed=seed)[0] for env, seed in zip(self._envs, seeds, strict=True)]
        self._steps = 0
        self._upright[:] = 0
        return np.stack(obs).astype(np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        torque = check_actions("the pendulum family", actions, (self.num_tasks, self.act_dim), self._steps,
                               self.max_episode_steps) * self.max_torque
        obs, reward = [], []
        for env, u in zip(self._envs, torque, strict=True):
            o, r, *_ = env.step(u)
            obs.append(o)
            reward.append(r)
        self._steps = (self._steps or 0) + 1
        angle = np.array([_normalise(env.state[0]) for env in self._envs])
        self._upright = np.where(np.abs(angle) <= UPRIGHT_ANGLE, self._upright + 1, 0)
        truncated = self._steps == self.max_episode_steps
        return StepResult(obs=np.stack(obs).astype(np.float32), reward=np.asarray(reward, dtype=np.float32),
                          terminated=np.zeros(self.num_tasks, dtype=bool),
                          truncated=np.full(self.num_tasks, truncated, dtype=bool),
                          success=(self._upright >= HOLD_STEPS).astype(np.float32))


def _normalise(angle: float) -> float:
    """An angle in [-π, π), 0 upright (Pendulum-v1's convention)."""
    return float((angle + np.pi) % (2 * np.pi) - np.pi)
