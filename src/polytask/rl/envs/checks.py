"""Checks every family shares: its ``tasks`` option (a subset, in the order given), reset seeds and actions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from polytask.core.errors import InvalidParameterError, closest


def select_tasks(family: str, tasks: Sequence[str] | None, known: Iterable[str]) -> tuple[str, ...]:
    """``tasks`` checked against the family's ``known`` names (all of them, in their order, when None)."""
    known = list(known)
    if tasks is None:
        return tuple(known)
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise InvalidParameterError(f"option `tasks` of environment {family!r} is a list of task names; found {tasks!r}")
    if not tasks:
        raise InvalidParameterError(f"option `tasks` of environment {family!r} needs at least one task; found an empty list")
    for name in tasks:
        if name not in known:
            raise InvalidParameterError(f"environment {family!r} has no task {name!r}.{closest(name, known)} "
                                        f"Its tasks: {', '.join(known)}")
    repeated = sorted({t for t in tasks if list(tasks).count(t) > 1})
    if repeated:
        raise InvalidParameterError(f"option `tasks` of environment {family!r} names {', '.join(repeated)} more than once")
    return tuple(tasks)


def check_seeds(family: str, num_tasks: int, seeds: Sequence[int]) -> list[int]:
    """One reset seed per task, as ints."""
    if len(seeds) != num_tasks:
        raise InvalidParameterError(f"`reset` of {family} takes one seed per task ({num_tasks}); found {len(seeds)}")
    return [int(s) for s in seeds]


def check_actions(family: str, actions: np.ndarray, shape: tuple[int, int], steps: int | None, length: int) -> np.ndarray:
    """(T, act_dim) actions clipped to [-1, 1], in an episode that has started (``steps`` not None) and not ended."""
    actions = np.asarray(actions, dtype=np.float64)
    if actions.shape != shape:
        raise InvalidParameterError(f"`step` of {family} takes actions of shape {shape}; found {actions.shape}")
    if steps is None or steps >= length:
        raise InvalidParameterError(f"{family}'s episode has {'not started' if steps is None else 'ended'}: call reset "
                                    f"before step (episodes are {length} steps)")
    return np.clip(actions, -1.0, 1.0)
