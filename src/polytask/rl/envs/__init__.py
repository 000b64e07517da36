"""Multi-task environment families (one environment per task, stepped in lockstep)."""

from polytask.rl.envs.base import MultiTaskEnv, StepResult

__all__ = ["MultiTaskEnv", "StepResult"]
