"""Atomic checkpoint files, loaded without executing code."""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from polytask.core.errors import PolytaskError


class CheckpointError(PolytaskError):
    """A checkpoint is missing, truncated or not a polytask checkpoint."""


def atomic_write(path: Path, write: Any) -> None:
    """Write via ``write(handle)`` into a temporary file, fsync it, then rename it over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600 files; run files get the mode open() would give
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def umask() -> int:
    """The process umask, read without changing it where Linux tells it (``/proc/self/status``);
    elsewhere set and restored at once."""
    try:
        status = Path("/proc/self/status").read_text().splitlines()
    except OSError:  # no /proc (not Linux)
        status = []
    for line in status:
        if line.startswith("Umask:"):
            return int(line.split()[1], 8)
    current = os.umask(0o022)
    os.umask(current)
    return current


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def save_checkpoint(path: Path, state: dict[str, Any], previous: Path | None = None) -> None:
    """Write ``state`` atomically; with ``previous``, the file it replaces is kept there first
    (by a hard link, so ``path`` itself never disappears)."""
    if previous is not None and path.exists():
        link = previous.with_name(previous.name + ".link")
        link.unlink(missing_ok=True)
        os.link(path, link)
        os.replace(link, previous)
    atomic_write(path, lambda handle: torch.save(state, handle))


def load_latest(path: Path, previous: Path) -> dict[str, Any]:
    """Load ``path``; if it is missing or corrupt, fall back to ``previous`` with a warning."""
    try:
        return load_checkpoint(path)
    except CheckpointError as exc:
        if not previous.exists():
            raise
        state = load_checkpoint(previous)
        warnings.warn(f"{exc}; resuming from the previous checkpoint {previous} instead", stacklevel=2)
        return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load with ``weights_only=True``: tensors and plain containers only, no pickled code."""
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(_unreadable(path, exc)) from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a polytask checkpoint (no 'model' entry)")
    return state


def _unreadable(path: Path, exc: Exception) -> str:
    """Why ``path`` failed the safe load, without torch's advice to retry with ``weights_only=False``
    (that would run whatever code the file carries: wrong advice for a file that failed this check)."""
    text = str(exc)
    if "weights only load failed" in text.lower() or "weights_only" in text:
        kept = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in text.splitlines()
                if line.strip() and "weights_only" not in line and "weights only load failed" not in line.lower()
                and "torch.load" not in line and "trusted source" not in line]
        reason = " ".join(kept)[:300].rstrip(". ") or "it holds objects other than tensors and plain containers"
        return (f"checkpoint {path} failed the safe load, which accepts tensors and plain containers only ({reason}); "
                "a polytask checkpoint holds nothing else, so this file was altered or is not one: do not load it, "
                "use a checkpoint you trust or train again")
    first = text.strip().splitlines()[0].split(". ")[0].rstrip(". ")[:300] if text.strip() else type(exc).__name__
    return (f"checkpoint {path} is corrupt or not a polytask checkpoint ({first}); expected a file polytask "
            "wrote: use checkpoints/previous.pt or another checkpoint, or train again")
