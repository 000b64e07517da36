"""Multi-task environment families (one environment per task, stepped in lockstep)."""

from polytask.rl.envs.base import MultiTaskEnv, StepResult
from polytask.rl.envs.registry import ENVIRONMENTS, make_env

__all__ = ["ENVIRONMENTS", "MultiTaskEnv", "StepResult", "make_env"]
