"""The run directory contract: config.yaml, metrics.csv, steps.csv, summary.json, training.png,
checkpoints/{last,best}.pt. Every file is written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polytask.core.errors import ConfigError
from polytask.train.checkpoint import atomic_write_text

METRIC_FIELDS = ("epoch", "split", "task", "metric", "value")
STEP_FIELDS = ("step", "epoch", "task", "loss", "weight")
GRADIENT_FIELDS = ("step", "kind", "name", "value")
RUN_FILES = ("config.yaml", "metrics.csv", "steps.csv", "summary.json", "training.png", "preprocess.json",
             "gradients.csv", "gradients.png",
             "checkpoints", "single_task")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf, -inf) inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


class RunDir:
    """A run's folder. ``prepare`` refuses an existing one unless resuming or overwriting."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def previous(self) -> Path:
        """The checkpoint ``last.pt`` replaced: the fallback if ``last.pt`` is ever damaged."""
        return self.checkpoints / "previous.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.pt"

    def exists(self) -> bool:
        """A run was started here (any file of the contract is present)."""
        return any((self.path / name).exists() for name in RUN_FILES if name != "single_task")

    def check(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Refuse to touch an existing run unless told how; touches nothing itself."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.exists() and not (resume or overwrite):
            raise ConfigError(
                f"run directory {self.path} already exists; pass --resume to continue it or --overwrite to replace it")

    def prepare(self, *, resume: bool = False, overwrite: bool = False) -> None:
        self.check(resume=resume, overwrite=overwrite)
        if resume and not (self.last.exists() or self.previous.exists()):
            raise ConfigError(f"cannot resume: {self.last} does not exist")
        if overwrite:
            self.clear()
        self.checkpoints.mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Remove the files of a previous run, and only those (never the folder's other files)."""
        for name in RUN_FILES:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def write_text(self, name: str, text: str) -> None:
        atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data: Mapping[str, Any]) -> None:
        """Strict JSON (RFC 8259): NaN and ±inf are written as ``null``.

        Python's default ``NaN`` / ``Infinity`` literals are rejected by strict parsers
        (JavaScript's ``JSON.parse``, jq, Go, serde), so a run whose loss diverged would leave a
        summary.json that no tool can read; ``null`` says "no finite value" in every parser.
        """
        self.write_text(name, json.dumps(strict_json(data), indent=2, sort_keys=False, allow_nan=False) + "\n")

    def write_csv(self, name: str, fields: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(fields), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        self.write_text(name, buffer.getvalue())
