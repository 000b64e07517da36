"""Multi-task reinforcement learning: multi-task SAC, task-conditioned and CARE encoders.

Environment families live in :mod:`polytask.rl.envs`; every family steps T tasks in lockstep
through the :class:`~polytask.rl.envs.base.MultiTaskEnv` contract.
"""
