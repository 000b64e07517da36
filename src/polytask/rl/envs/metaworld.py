"""Meta-World MT10 (v3 tasks): ten Sawyer-arm manipulation tasks, stepped in lockstep."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from polytask.core.errors import InvalidParameterError, require
from polytask.rl.envs.base import MultiTaskEnv, StepResult
from polytask.rl.envs.checks import check_actions, check_seeds, select_tasks

EXTRA = "rl-metaworld"

#: MT10's tasks in Meta-World's order, each with one sentence for its context embedding. Meta-World 3
#: names them ``*-v3``; mtrl's pretrained embeddings key the v1 names (``reach-v1`` …), so these
#: sentences are written here rather than taken from mtrl.
DESCRIPTIONS: dict[str, str] = {
    "reach-v3": "Reach a goal position in the air with the gripper.",
    "push-v3": "Push a puck across the table to a goal position.",
    "pick-place-v3": "Pick up a puck and place it at a goal position.",
    "door-open-v3": "Open a door on a hinge by pulling its handle.",
    "drawer-open-v3": "Open a drawer by pulling its handle out.",
    "drawer-close-v3": "Close an open drawer by pushing it in.",
    "button-press-topdown-v3": "Press a button down from above.",
    "peg-insert-side-v3": "Insert a peg sideways into a hole in a box.",
    "window-open-v3": "Slide a window open by pushing its handle sideways.",
    "window-close-v3": "Slide a window closed by pushing its handle sideways.",
}
GOALS = ("sampled", "fixed")
EPISODE_STEPS = 500  # Meta-World's max_path_length


def _benchmark(goal_seed: int) -> Any:
    """``metaworld.MT10(seed=goal_seed)``, built once per process: drawing its 500 goals takes seconds."""
    return _built_benchmark(require("metaworld", EXTRA), goal_seed)  # the package is checked every time


@functools.lru_cache(maxsize=4)
def _built_benchmark(metaworld: Any, goal_seed: int) -> Any:
    return metaworld.MT10(seed=goal_seed)


class MetaWorldMT10(MultiTaskEnv):
    """Meta-World MT10 (Yu, Quillen, He, Julian, Hausman, Finn & Levine, "Meta-World: A Benchmark and
    Evaluation for Multi-Task and Meta Reinforcement Learning", CoRL 2019; the v3 environments of
    McLean et al., "Meta-World+: An Improved, Standardized, RL Benchmark", arXiv 2505.11289, 2025),
    one environment per task.

    Observation 39-d (end-effector position and gripper opening, two objects' positions and
    quaternions, the same 18 values of the previous step, the goal position); action 4-d in
    [-1, 1] (end-effector displacement, gripper effort: Meta-World's own range, so no rescaling);
    dense reward in [0, 10] (Meta-World's v2 reward functions); 500-step episodes, never
    terminated early; success is Meta-World's ``info["success"]`` at each step.

    Each task has the benchmark's 50 goal variations (object and goal positions), drawn once from
    ``goal_seed`` exactly as ``metaworld.MT10(seed=goal_seed)`` (and ``gym.make_vec("Meta-World/MT10",
    seed=goal_seed)``) draws them. ``goals="sampled"`` (the benchmark's protocol): each episode
    uses the variation picked by its reset seed; ``goals="fixed"``: every episode uses the first
    one (a single goal per task, an easier problem).

    Departures
    ----------
    - The environments are built from ``metaworld.MT10``'s classes and tasks without gymnasium's
      wrappers (``TimeLimit``, the random task selection, episode statistics): the family picks
      each episode's goal from its reset seed, so an episode is a pure function of that seed.
    """

    max_episode_steps = EPISODE_STEPS
    obs_dim = 39
    act_dim = 4

    def __init__(self, *, tasks: Sequence[str] | None = None, goals: str = "sampled", goal_seed: int = 0) -> None:
        if goals not in GOALS:
            raise InvalidParameterError(f"option `goals` of environment 'mt10' must be one of {', '.join(GOALS)}; "
                                        f"found {goals!r}")
        if not isinstance(goal_seed, int) or isinstance(goal_seed, bool) or goal_seed < 0:
            raise InvalidParameterError(f"option `goal_seed` of environment 'mt10' must be an int >= 0; found {goal_seed!r}")
        self.task_names = select_tasks("mt10", tasks, DESCRIPTIONS)
        self.descriptions = {name: DESCRIPTIONS[name] for name in self.task_names}
        self.goals, self.goal_seed = goals, goal_seed
        benchmark = _benchmark(goal_seed)
        self._envs = [benchmark.train_classes[name]() for name in self.task_names]
        self._variations = [[t for t in benchmark.train_tasks if t.env_name == name] for name in self.task_names]
        self._steps: int | None = None  # steps into the episode; None before the first reset

    def reset(self, seeds: list[int]) -> np.ndarray:
        obs = []
        for env, variations, seed in zip(self._envs, self._variations, check_seeds("mt10", self.num_tasks, seeds), strict=True):
            index = int(np.random.default_rng(seed).integers(len(variations))) if self.goals == "sampled" else 0
            env.set_task(variations[index])
            env.seed(seed)  # the environment's own generator, should a task draw from it at reset
            obs.append(env.reset()[0])
        self._steps = 0
        return np.stack(obs).astype(np.float32)

    def step(self, actions: np.ndarray) -> StepResult:
        actions = check_actions("mt10", actions, (self.num_tasks, self.act_dim), self._steps,
                                self.max_episode_steps).astype(np.float32)
        obs, reward, success = [], [], []
        for env, action in zip(self._envs, actions, strict=True):
            o, r, _, _, info = env.step(action)
            obs.append(o)
            reward.append(r)
            success.append(float(info["success"]))
        self._steps = (self._steps or 0) + 1
        truncated = self._steps == self.max_episode_steps
        return StepResult(obs=np.stack(obs).astype(np.float32), reward=np.asarray(reward, dtype=np.float32),
                          terminated=np.zeros(self.num_tasks, dtype=bool),
                          truncated=np.full(self.num_tasks, truncated, dtype=bool),
                          success=np.asarray(success, dtype=np.float32))

    def close(self) -> None:
        for env in self._envs:
            env.close()
