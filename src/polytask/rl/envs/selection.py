"""The ``tasks`` option every family takes: a subset of its tasks, in the order given."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
