"""The best split of the tasks into at most B groups, from an affinity matrix.

Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task Learning", NeurIPS 2021,
Section 3.2 (after Standley et al., "Which Tasks Should Be Learned Together in Multi-task
Learning?", ICML 2020): with Z_{i→j} the affinity of task i onto task j, a task j in group S
scores the mean affinity onto it from the other members,

    s_j(S) = (1 / (|S| − 1)) Σ_{i ∈ S, i ≠ j} Z_{i→j}     (0 for a task alone: no transfer),

and a split scores Σ over groups Σ_{j ∈ S} s_j(S). The search returns the split of the T tasks
into at most B non-empty groups with the highest total.

The search is exact. It assigns tasks one at a time to an existing group or a new one (each
split is reached once) and prunes a branch when an upper bound on its best completion cannot
beat the best split found: a placed task's final score is at most the best mean reachable by
adding unplaced tasks to its group, an unplaced task's at most max(0, max_i Z_{i→j}). Up to
``MAX_TASKS`` tasks; the number of splits grows as the Bell numbers (T = 12: 4.2 million), so
time depends on how well the bound prunes (T = 12 takes seconds on random matrices).

Departures:
    - Groups are a partition (every task in exactly one group), as the issue asks; the paper also
      allows a task in several groups, served by its best one.
    - The Z matrix may come from TAG or from mean gradient cosines (symmetric); both read the
      same way (higher = trains better together).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from polytask.core.errors import InvalidParameterError, ShapeError

MAX_TASKS = 16


@dataclass(frozen=True)
class Grouping:
    """A split: ``groups`` (task names, in task order), the score of each task, and the total."""

    groups: tuple[tuple[str, ...], ...]
    task_scores: dict[str, float]
    total: float

    def group_scores(self) -> list[float]:
        return [sum(self.task_scores[t] for t in g) for g in self.groups]


def check_matrix(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str]) -> list[list[float]]:
    """A square, finite matrix with one row per task (None off the diagonal is refused)."""
    if len(set(tasks)) != len(tasks) or not tasks:
        raise InvalidParameterError(f"task names must be distinct and non-empty; found {list(tasks)}")
    if len(matrix) != len(tasks) or any(len(row) != len(tasks) for row in matrix):
        raise ShapeError(f"the affinity matrix must be {len(tasks)}×{len(tasks)} (one row per task: {', '.join(tasks)}); "
                         f"found {len(matrix)} rows of lengths {[len(r) for r in matrix]}")
    out = []
    for i, row in enumerate(matrix):
        values = []
        for j, v in enumerate(row):
            if i != j and (v is None or not math.isfinite(float(v))):
                raise InvalidParameterError(f"affinity {tasks[i]} → {tasks[j]} is {v!r}; every off-diagonal entry must be a "
                                            "finite number (train longer, or with both tasks at the same steps)")
            values.append(0.0 if i == j else float(v))  # type: ignore[arg-type]
        out.append(values)
    return out


def task_score(z: list[list[float]], group: Sequence[int], j: int) -> float:
    """s_j(S): the mean affinity onto j from the other members (0 alone)."""
    others = [i for i in group if i != j]
    return sum(z[i][j] for i in others) / len(others) if others else 0.0


def _score(z: list[list[float]], groups: Sequence[Sequence[int]]) -> float:
    return sum(task_score(z, g, j) for g in groups for j in g)


def _result(z: list[list[float]], tasks: Sequence[str], groups: Sequence[Sequence[int]]) -> Grouping:
    ordered = sorted((sorted(g) for g in groups if g), key=lambda g: g[0])
    scores = {tasks[j]: task_score(z, g, j) for g in ordered for j in g}
    return Grouping(tuple(tuple(tasks[j] for j in g) for g in ordered), scores, sum(scores.values()))


def _check(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str], max_groups: int) -> list[list[float]]:
    if isinstance(max_groups, bool) or not isinstance(max_groups, int) or max_groups < 1:
        raise InvalidParameterError(f"the number of groups must be an int >= 1; found {max_groups!r}")
    if len(tasks) > MAX_TASKS:
        raise InvalidParameterError(f"the exact group search handles at most {MAX_TASKS} tasks (the number of splits "
                                    f"grows as the Bell numbers); found {len(tasks)}")
    return check_matrix(matrix, tasks)


def exhaustive_grouping(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str], max_groups: int) -> Grouping:
    """Every split into at most ``max_groups`` groups, scored; the best (ties: the first met). For checks."""
    z = _check(matrix, tasks, max_groups)
    best: tuple[float, list[list[int]]] = (-math.inf, [])

    def walk(j: int, groups: list[list[int]]) -> None:
        nonlocal best
        if j == len(tasks):
            s = _score(z, groups)
            if s > best[0] + 1e-12:
                best = (s, [list(g) for g in groups])
            return
        for g in groups:
            g.append(j)
            walk(j + 1, groups)
            g.pop()
        if len(groups) < max_groups:
            groups.append([j])
            walk(j + 1, groups)
            groups.pop()

    walk(0, [])
    return _result(z, tasks, best[1])


def best_grouping(matrix: Sequence[Sequence[float | None]], tasks: Sequence[str], max_groups: int) -> Grouping:
    """The highest-scoring split into at most ``max_groups`` groups (exact branch and bound)."""
    z = _check(matrix, tasks, max_groups)
    n = len(tasks)
    # an unplaced task's score can never exceed max(0, best single affinity onto it)
    alone_bound = [max(0.0, max((z[i][j] for i in range(n) if i != j), default=0.0)) for j in range(n)]
    best: tuple[float, list[list[int]]] = (-math.inf, [])

    def placed_bound(group: list[int], j: int, next_task: int) -> float:
        others = [z[i][j] for i in group if i != j]
        extra = sorted((z[u][j] for u in range(next_task, n)), reverse=True)
        if not others:  # alone now: stays 0, or gains at best its largest unplaced affinity
            return max(0.0, extra[0]) if extra else 0.0
        total, count = sum(others), len(others)
        for value in extra:  # adding the largest values while they raise the mean gives the best mean
            if value * count <= total:
                break
            total, count = total + value, count + 1
        return total / count

    def bound(groups: list[list[int]], next_task: int) -> float:
        return (sum(placed_bound(g, j, next_task) for g in groups for j in g)
                + sum(alone_bound[j] for j in range(next_task, n)))

    def walk(j: int, groups: list[list[int]]) -> None:
        nonlocal best
        if j == n:
            s = _score(z, groups)
            if s > best[0] + 1e-12:
                best = (s, [list(g) for g in groups])
            return
        if bound(groups, j) <= best[0] + 1e-12:
            return
        for g in groups:
            g.append(j)
            walk(j + 1, groups)
            g.pop()
        if len(groups) < max_groups:
            groups.append([j])
            walk(j + 1, groups)
            groups.pop()

    walk(0, [])
    return _result(z, tasks, best[1])
