"""Environment families by name: ``make_env("pendulum")``, ``make_env("mt10", tasks=[...])``."""

from __future__ import annotations

from typing import Any

from polytask.core.registry import Registry
from polytask.rl.envs.base import MultiTaskEnv
from polytask.rl.envs.metaworld import MetaWorldMT10
from polytask.rl.envs.pendulum import PendulumFamily

#: Family name → class; each takes its options as keyword arguments (``tasks`` in every family).
#: The classes import gymnasium / metaworld only when built, so listing them needs neither.
ENVIRONMENTS: Registry[MultiTaskEnv] = Registry("environment")
ENVIRONMENTS.register("pendulum")(PendulumFamily)
ENVIRONMENTS.register("mt10")(MetaWorldMT10)


def make_env(name: str, /, **options: Any) -> MultiTaskEnv:
    """The family ``name`` built with ``options``; unknown names and options fail with the closest valid one."""
    return ENVIRONMENTS.create(name, **options)
