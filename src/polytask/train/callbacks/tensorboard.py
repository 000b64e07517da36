"""TensorBoard logging as a callback: ``callbacks: [{name: tensorboard, every: 10}]``.

An optional extra (``pip install 'polytask[tensorboard]'``): the events are written with
``torch.utils.tensorboard.SummaryWriter``, which ships with torch and only needs the
``tensorboard`` package, so the extra never pulls a second torch build.

Every scalar is placed on one x axis, the trainer's global step, so that a resumed run can
purge what a crashed run wrote past its checkpoint in a single cut (TensorBoard's purge is by
step, across all tags):

=================================  ==========================================================
tag                                when, at which step
=================================  ==========================================================
``loss/<task>``                    every ``every``-th step (tasks without a loss are skipped)
``weight/<task>``                  every ``every``-th step
``health/<kind>/<name>``           each row of ``trainer.health.rows`` once, at its own step
                                   (kind: total_norm, layer_norm, task_norm, cosine)
``<split>/<task>/<metric>``        each epoch, at the epoch's last step
``lr/group<i>``                    each epoch, at the epoch's last step (the rate that step used)
``final/<task>/<metric>``          at the end of the fit, from the summary's final evaluation
``final/delta_m``                  idem, when the summary has baselines
text ``config``, ``method``        at the start of each fit (the resolved YAML, the method)
=================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polytask.core.errors import InvalidParameterError, MissingDependencyError
from polytask.train.callbacks.base import CALLBACKS
from polytask.train.callbacks.scalars import ScalarLogger

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

    from polytask.train.trainer import Trainer

INSTALL = "pip install 'polytask[tensorboard]'  (or: pip install tensorboard)"


def _require_tensorboard() -> None:
    """Fail with the install command when the ``tensorboard`` package is missing.

    Checked on the package itself, not on ``torch.utils.tensorboard``: torch ships that module
    but it only works with tensorboard installed."""
    try:
        import tensorboard  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(
            f"the 'tensorboard' callback needs the 'tensorboard' package, which is not installed; install it with: {INSTALL}"
        ) from exc


@CALLBACKS.register("tensorboard")
class TensorBoardLogger(ScalarLogger):
    """Log per-task losses, task weights, metrics, learning rates and gradient health to TensorBoard.

    Args:
        log_dir: where the event files go; default ``<run dir>/tensorboard``.
        every: log the per-step scalars (losses, weights) every this many steps; epoch scalars
            and gradient-health rows are always logged.

    Only the main data-parallel rank writes. A resumed run purges the events a crashed run wrote
    at or past the step it resumes from, then writes those steps again: no step appears twice.
    """

    key = "tensorboard"  # the checkpoint's name for this callback's state, stable across renames

    def __init__(self, *, log_dir: str | None = None, every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidParameterError(f"tensorboard: 'every' must be an integer >= 1, found {every!r}")
        _require_tensorboard()  # at construction: a config naming this callback fails before training starts
        self.log_dir = log_dir
        self.every = every
        self.directory: Path | None = None
        self._writer: SummaryWriter | None = None
        self._health_step = -1  # health rows at steps <= this one are written
        self._last_step: int | None = None  # the last step seen this epoch: epoch scalars go there
        self._lrs: list[float] | None = None  # the learning rates that step used

    # ------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.directory = self._resolve_dir(trainer)
        start = int(trainer.step_index)
        # The trainer resumes at `start`: whatever a crashed run wrote at steps >= start is
        # orphaned (the resumed run writes those steps again), so TensorBoard is told to drop it.
        # A fresh run purges nothing: the directory may hold another run's events.
        self._writer = SummaryWriter(str(self.directory), purge_step=start if start > 0 else None, flush_secs=30)
        self._health_step = start - 1  # rows before `start` came back with the checkpoint, already written
        self._last_step, self._lrs = None, None
        self._writer.add_text("method", str(trainer.method_name), global_step=start)
        if trainer.config_text is not None:
            # indented four spaces: TensorBoard renders text as Markdown, this keeps the YAML verbatim
            self._writer.add_text("config", _as_code(trainer.config_text), global_step=start)

    def _active(self) -> bool:
        return self._writer is not None

    def _scalar(self, tag: str, value: float, step: int) -> None:
        assert self._writer is not None
        self._writer.add_scalar(tag, value, global_step=step)

    def _flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self._writer is None:
            return
        self._log_final(trainer, summary)
        self._writer.close()
        self._writer = None

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint is being taken: what it covers must be on disk, since a run resumed from it
        # starts after these steps and never writes them again.
        if self._writer is not None:
            self._writer.flush()
        # Nothing else to keep: the trainer's restored step index says where to purge from.
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore (see ``state_dict``)."""

    # ---------------------------------------------------------------------------- helpers
    def _resolve_dir(self, trainer: Trainer) -> Path:
        if self.log_dir is not None:
            path = Path(self.log_dir)
        elif trainer.run_dir is not None:
            path = Path(trainer.run_dir) / "tensorboard"
        else:
            raise InvalidParameterError(
                "tensorboard: this trainer writes no run directory, so there is no default log_dir; "
                "give the callback a log_dir or the trainer a run directory"
            )
        path.mkdir(parents=True, exist_ok=True)
        return path


def _as_code(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())
