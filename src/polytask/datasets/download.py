"""Fetch a data file once, verify its SHA-256, and keep it in a local cache."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

from polytask.core.errors import DataError


def cache_dir() -> Path:
    """``$POLYTASK_DATA`` or ``~/.cache/polytask``."""
    return Path(os.environ.get("POLYTASK_DATA", Path.home() / ".cache" / "polytask"))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(url: str, filename: str, checksum: str, *, directory: Path | None = None, timeout: float = 30.0) -> Path:
    """Return the cached file, downloading it first if needed.

    The download goes to a temporary file in the cache folder and is renamed into place only
    after its checksum matches, so an interrupted or corrupted transfer never poses as data.
    """
    folder = directory or cache_dir()
    target = folder / filename
    if target.exists():
        if sha256(target) == checksum:
            return target
        raise DataError(f"cached file {target} does not match its SHA-256 {checksum}; delete it to download again")
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=folder, prefix=f".{filename}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            shutil.copyfileobj(response, out)
            out.flush()
            os.fsync(out.fileno())
        found = sha256(tmp)
        if found != checksum:
            raise DataError(f"download of {url} has SHA-256 {found}; expected {checksum}")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
