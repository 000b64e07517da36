"""The run directory contract: config.yaml, metrics.csv, steps.csv, summary.json, training.png,
environment.json, checkpoints/{last,best}.pt. Every file is written atomically."""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from polytask.core.errors import ConfigError
from polytask.train.checkpoint import atomic_write_text

METRIC_FIELDS = ("epoch", "split", "task", "metric", "value")
STEP_FIELDS = ("step", "epoch", "task", "loss", "weight")
GRADIENT_FIELDS = ("step", "kind", "name", "value")
RUN_FILES = ("config.yaml", "metrics.csv", "steps.csv", "summary.json", "training.png", "preprocess.json",
             "gradients.csv", "gradients.png", "environment.json", "tensorboard", "mlflow", "diagnostics", "model.json",
             "checkpoints", "single_task")
#: hidden folders inside a run directory holding the run an ``--overwrite`` replaces (see RunDir)
MOVING, ASIDE, RESTORING = ".replaced-run.moving", ".replaced-run", ".replaced-run.restoring"
MANIFEST = "manifest.json"


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf, -inf) inside dicts, lists and tuples replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def _remove(target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    elif target.exists() or target.is_symlink():
        target.unlink()


def _sync(folder: Path) -> None:
    """Make the renames inside ``folder`` durable."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some file systems cannot fsync a folder (EINVAL): the renames stand, unflushed
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _owner(folder: Path) -> str:
    """Who is replacing a run: ``self`` (this process), ``alive`` (another running process on
    this host) or ``dead`` (a process that was killed; its work is recovered)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        pid, host = int(manifest["pid"]), str(manifest["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "dead"
    if host != socket.gethostname() or pid <= 0:
        return "dead"
    if pid == os.getpid():
        return "self"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except OSError:  # exists, owned by someone else
        return "alive"
    return "alive"


def _git(folder: Path) -> dict[str, Any] | None:
    """The commit of the git checkout holding ``folder`` (and whether it has uncommitted changes)."""
    try:
        head = subprocess.run(["git", "-C", str(folder), "rev-parse", "--show-toplevel", "HEAD"], capture_output=True,
                              text=True, timeout=5, check=False)
        if head.returncode != 0:
            return None
        root, commit = head.stdout.split()[:2]
        status = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return {"root": root, "commit": commit, "dirty": bool(status.stdout.strip()) if status.returncode == 0 else None}


def environment() -> dict[str, Any]:
    """Where a run ran: package versions, Python, the host, the command and the git commit (of
    the working folder's checkout, and of polytask's own when it runs from one)."""
    from importlib import metadata

    import polytask

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    torch = sys.modules.get("torch")
    env: dict[str, Any] = {
        "polytask": polytask.__version__, "torch": getattr(torch, "__version__", None) or version("torch"),
        "numpy": version("numpy"), "python": platform.python_version(), "platform": platform.platform(),
        "host": socket.gethostname(), "cwd": os.getcwd(), "command": list(sys.argv),
    }
    if torch is not None and torch.cuda.is_available():
        env["cuda"] = {"version": torch.version.cuda,
                       "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}
    work = _git(Path.cwd())
    env["git"] = work
    source = _git(Path(polytask.__file__).resolve().parent)
    if source is not None and (work is None or source["root"] != work["root"]):
        env["polytask_git"] = source
    return env


class RunDir:
    """A run's folder: the files of ``RUN_FILES`` (and only those) belong to the run.

    ``prepare`` refuses a run that exists (it has a checkpoint or a summary.json) unless resuming
    or overwriting. Files a run left without ever writing a checkpoint (it failed or was killed
    in its first epoch) are not a run: a new run in the folder removes them, with a warning.

    Overwriting never loses the old run before the new one can stand in for it. ``--overwrite``
    moves the old run's files into the hidden folder ``.replaced-run/`` inside the run directory
    (each move a rename; the list of moved names is written first, in ``manifest.json``). The new
    run then writes its files in place; its first ``checkpoints/last.pt`` (a complete file:
    checkpoints are written to a temporary file and renamed) is what makes it the run, and the
    old files are deleted right after it (``settle``). If the new run fails before that, the old
    files are moved back (``rollback``). A SIGKILL at any moment leaves the folder in one of these
    states, which the next ``prepare`` (any ``polytask train`` in the folder) or ``recover`` completes:

    * ``.replaced-run.moving/`` (killed while moving the old files aside; the new run has not
      started): the old files are moved back;
    * ``.replaced-run/`` without a new ``checkpoints/last.pt``: the new run's files are removed
      and the old files moved back; with one: the old files are deleted (the new run resumes);
    * ``.replaced-run.restoring/`` (killed while moving them back): the move back is finished.

    Every step of these is a rename or a removal that can be repeated, so a kill during a
    recovery is recovered the same way. The guarantee: after a kill at any moment, either the
    old run or the new one (resumable with ``--resume``) is there, never neither. A process that
    is still running (its id is in the manifest) is left alone.
    """

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

    def has_checkpoint(self) -> bool:
        """A run can be resumed from here (``last.pt`` or its fallback ``previous.pt``)."""
        return self.last.exists() or self.previous.exists()

    def exists(self) -> bool:
        """A run is here: it wrote a checkpoint or finished (summary.json)."""
        return self.has_checkpoint() or self.best.exists() or (self.path / "summary.json").exists()

    def leftovers(self) -> list[str]:
        """Run files of an attempt that stopped before its first checkpoint (empty when a run exists)."""
        if self.exists():
            return []
        return [name for name in RUN_FILES if name != "single_task" and (self.path / name).exists()
                and not ((self.path / name).is_dir() and not any((self.path / name).iterdir()))]  # empty folders hold nothing

    def check(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Refuse to touch an existing run unless told how, or a folder no run can be written to;
        touches nothing itself."""
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"output_dir {self.path} is a file; expected a folder for the run (new, or an earlier "
                              "run's): choose another output_dir")
        ancestor = next((p for p in (self.path, *self.path.parents) if p.exists()), None)
        if ancestor is not None and not ancestor.is_dir():
            raise ConfigError(f"output_dir {self.path} is inside {ancestor}, which is a file; expected a folder: "
                              "choose another output_dir")
        if ancestor is not None and not os.access(ancestor, os.W_OK | os.X_OK):
            raise ConfigError(f"output_dir {self.path} cannot be created: {ancestor} is not writable by you; "
                              "choose an output_dir you can write to")
        if self.exists() and not (resume or overwrite):
            raise ConfigError(
                f"run directory {self.path} already exists; pass --resume to continue it or --overwrite to replace it")
        if resume and not self.has_checkpoint():
            if not self.path.exists():
                raise ConfigError(f"cannot resume: run directory {self.path} does not exist; start the run without --resume")
            if self.exists():
                raise ConfigError(f"cannot resume: {self.last} does not exist, so the run in {self.path} cannot be "
                                  "continued; start it again with --overwrite instead of --resume")
            raise ConfigError(f"cannot resume: {self.last} does not exist (the run there stopped before its first "
                              "checkpoint); start it again without --resume (the files it left are replaced)")

    def prepare(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Check, then make the folder ready: the old run set aside (overwrite), an unfinished
        attempt's files removed (a new run), nothing touched (resume)."""
        self.recover()
        for name in (MOVING, ASIDE, RESTORING):
            if (self.path / name).exists() and _owner(self.path / name) == "alive":
                raise ConfigError(f"another polytask process is replacing the run in {self.path} (see "
                                  f"{self.path / name / MANIFEST}); expected one process per run directory: wait for "
                                  "it to finish or stop it, or choose another output_dir")
        self.check(resume=resume, overwrite=overwrite)
        if overwrite:
            self.set_aside()
        elif not resume:
            stale = self.leftovers()
            if stale:
                warnings.warn(f"{self.path} held files of a run that stopped before its first checkpoint "
                              f"({', '.join(stale)}); they are replaced by this run", stacklevel=2)
                self.clear(stale)
        try:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create the run directory {self.path} ({exc.strerror or exc}); expected a "
                              "folder you can write to: choose another output_dir") from None

    def clear(self, names: Sequence[str] = RUN_FILES) -> None:
        """Remove the files of a previous run, and only those (never the folder's other files)."""
        for name in names:
            _remove(self.path / name)

    # ------------------------------------------------------------------ safe --overwrite
    def set_aside(self) -> None:
        """Move the run files into ``.replaced-run/`` (see the class docstring)."""
        present = [name for name in RUN_FILES if (self.path / name).exists()]
        if not present:
            return
        moving = self.path / MOVING
        moving.mkdir(exist_ok=True)
        atomic_write_text(moving / MANIFEST, json.dumps({"names": present, "pid": os.getpid(),
                                                         "host": socket.gethostname()}))
        for name in present:
            os.replace(self.path / name, moving / name)
        os.replace(moving, self.path / ASIDE)
        _sync(self.path)

    def settle(self) -> None:
        """The new run has a checkpoint: delete the run this process set aside, if any."""
        aside = self.path / ASIDE
        if aside.exists() and self.has_checkpoint() and _owner(aside) == "self":
            shutil.rmtree(aside)

    def commit(self) -> None:
        """The new run finished: delete the run this process set aside, checkpoint or not (a
        ``--single-task`` run writes none at the top)."""
        aside = self.path / ASIDE
        if aside.exists() and _owner(aside) == "self":
            shutil.rmtree(aside)

    def rollback(self) -> None:
        """This process's new run failed: without a checkpoint of its own it is replaced by the
        run it set aside (a new run with a checkpoint stays, resumable)."""
        aside = self.path / ASIDE
        if aside.exists() and _owner(aside) == "self":
            if self.has_checkpoint():
                shutil.rmtree(aside)
            else:
                self._restore(aside)

    def recover(self) -> str | None:
        """Complete an ``--overwrite`` that a killed process left half done; say what was done."""
        if not self.path.is_dir():
            return None
        done = None
        for name in (RESTORING, MOVING, ASIDE):
            folder = self.path / name
            if not folder.exists() or _owner(folder) in ("self", "alive"):
                continue
            if name == ASIDE and self.has_checkpoint():
                shutil.rmtree(folder)
                done = (f"{self.path}: an --overwrite was interrupted after the new run's first checkpoint; the files "
                        "of the run it replaced are deleted (continue the new run with --resume)")
            else:
                self._restore(folder)
                done = (f"{self.path}: an --overwrite was interrupted before the new run's first checkpoint; the run "
                        "it was replacing is restored")
        if done:
            warnings.warn(done, stacklevel=2)
        return done

    def _restore(self, folder: Path) -> None:
        if folder.name != RESTORING:
            target = self.path / RESTORING
            os.replace(folder, target)
            folder = target
        try:
            moved = [str(n) for n in json.loads((folder / MANIFEST).read_text())["names"]]
        except (OSError, ValueError, KeyError, TypeError):
            moved = None  # killed before the manifest was written: nothing was moved, nothing new written
        if moved is not None:
            moved = [name for name in moved if name in RUN_FILES]
            for name in RUN_FILES:  # files only the new run had
                if name not in moved:
                    _remove(self.path / name)
            # the new run's atomic writes cut short by the kill (checkpoint.atomic_write's temporary files)
            for stray in self.path.glob(".*.tmp"):
                if any(stray.name.startswith(f".{name}.") for name in RUN_FILES):
                    _remove(stray)
            for name in moved:  # still aside: whatever is in place belongs to the new run
                if (folder / name).exists():
                    _remove(self.path / name)
                    os.replace(folder / name, self.path / name)
        shutil.rmtree(folder)
        _sync(self.path)

    # ------------------------------------------------------------------ environment
    def record_environment(self, epoch: int = 0) -> None:
        """environment.json: one entry per training segment (a resumed run adds one), with the
        versions of polytask, torch, numpy and Python, the git commit, the host and the command."""
        path = self.path / "environment.json"
        segments: list[Any] = []
        if path.exists():
            try:
                segments = list(json.loads(path.read_text()).get("segments", []))
            except (OSError, ValueError, AttributeError):
                segments = []
        segments.append({"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "from_epoch": epoch, **environment()})
        self.write_json("environment.json", {"segments": segments})

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
