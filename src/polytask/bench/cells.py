"""A resumable store of benchmark cells: a tidy CSV, one row per (cell, task, metric).

A cell is one training run (one method, architecture and seed on one data set, or one
single-task baseline, or one reference model). Its rows are written together, flushed and
synced, so a killed benchmark loses at most the cell it was running; reading the file back
yields the finished cells, which a rerun skips. A row cut short by a kill (fewer fields) or a
cell missing some of its tasks is not finished: it runs again, and only its new rows count.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from polytask.core.errors import DataError

FIELDS = ("dataset", "kind", "method", "architecture", "seed", "scope", "task", "metric", "value", "epochs",
          "seconds", "budget_s")
KINDS = ("single_task", "multi_task", "reference")


@dataclass(frozen=True)
class CellKey:
    """What identifies a cell. ``scope`` is the task a single-task baseline trains, ``all`` otherwise."""

    dataset: str
    kind: str
    method: str
    architecture: str
    seed: int
    scope: str = "all"


@dataclass
class Cell:
    key: CellKey
    metrics: dict[str, dict[str, float]]  # task → metric → test value
    epochs: int = 0
    seconds: float = 0.0
    budget_s: float = 0.0
    tasks: tuple[str, ...] = field(default=())

    def rows(self) -> list[dict[str, object]]:
        k = self.key
        return [{"dataset": k.dataset, "kind": k.kind, "method": k.method, "architecture": k.architecture,
                 "seed": k.seed, "scope": k.scope, "task": task, "metric": metric, "value": repr(float(value)),
                 "epochs": self.epochs, "seconds": f"{self.seconds:.2f}", "budget_s": f"{self.budget_s:g}"}
                for task, group in self.metrics.items() for metric, value in group.items()]


def read(path: Path) -> dict[CellKey, Cell]:
    """The cells in ``path`` (none when it does not exist); the last complete copy of a cell wins."""
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is not None and tuple(reader.fieldnames) != FIELDS:
            raise DataError(f"{path} is not a bench quality CSV: its header is {reader.fieldnames}; expected "
                            f"{list(FIELDS)} (write to another --csv, or move this file aside)")
        groups: dict[CellKey, list[dict[str, str]]] = {}
        order: list[CellKey] = []
        for row in reader:
            if None in row.values() or None in row:  # cut short by a kill, or a stray field
                continue
            try:
                key = CellKey(row["dataset"], row["kind"], row["method"], row["architecture"], int(row["seed"]),
                              row["scope"])
                float(row["value"])
            except ValueError:
                continue
            if key not in groups or _restarts(groups[key], row):
                groups[key] = []
                order.append(key)
            groups[key].append(row)
    cells: dict[CellKey, Cell] = {}
    for key in dict.fromkeys(order):
        rows = groups[key]
        metrics: dict[str, dict[str, float]] = {}
        for row in rows:
            metrics.setdefault(row["task"], {})[row["metric"]] = float(row["value"])
        cells[key] = Cell(key, metrics, int(rows[-1]["epochs"]), float(rows[-1]["seconds"]),
                          float(rows[-1]["budget_s"]), tuple(metrics))
    return cells


def _restarts(rows: list[dict[str, str]], row: dict[str, str]) -> bool:
    """A (task, metric) seen again for the same key: a rerun of that cell starts here."""
    return any(r["task"] == row["task"] and r["metric"] == row["metric"] for r in rows)


def finished(cells: Mapping[CellKey, Cell], key: CellKey, tasks: Iterable[str]) -> bool:
    """Whether ``key`` has a value for each of ``tasks`` (a cell cut short by a kill has not)."""
    cell = cells.get(key)
    return cell is not None and all(t in cell.metrics and cell.metrics[t] for t in tasks)


def append(path: Path, cell: Cell) -> None:
    """Write the cell's rows in one write, then flush and sync (the header first in a new file)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, lineterminator="\n")
    new = not path.exists() or path.stat().st_size == 0
    if new:
        writer.writeheader()
    writer.writerows(cell.rows())
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = not new and _ends_mid_line(path)
    with path.open("a", newline="") as handle:
        handle.write(("\n" if torn else "") + buffer.getvalue())
        handle.flush()
        os.fsync(handle.fileno())


def _ends_mid_line(path: Path) -> bool:
    """A row cut short by a kill: the next cell must not continue that line."""
    with path.open("rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def finite(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))
