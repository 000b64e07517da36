"""The callback contract: everything around the training loop reads the loop through four hooks.

Checkpoints, early stopping, CSV files, plots, the console line and the optional TensorBoard /
MLflow loggers are callbacks; so is anything a user adds (``Trainer(callbacks=[...])`` from
Python, ``callbacks: [{name: ...}]`` from YAML). A callback that keeps state between steps
returns it from ``state_dict`` so a resumed run continues it exactly.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from polytask.core.errors import InvalidParameterError
from polytask.core.registry import Registry
from polytask.data.dataset import Batch
from polytask.engine.backward import StepReport

if TYPE_CHECKING:
    from polytask.train.trainer import Trainer


@dataclass(frozen=True)
class TrainStep:
    """One training step as the loop saw it.

    Attributes:
        index: the trainer's global step (0-based).
        epoch: the epoch (0-based).
        losses: every task's loss value this step (None: no labelled sample or not scheduled).
        weights: the weight each task's loss received (0 when it did not train).
        report: the engine's report, or None when the step was dropped before the engine ran
            (a non-finite loss).
        applied: False when the update was not applied (non-finite values, health policy skip).
        batches: the step's batches (on the training device) when the update was applied, for
            callbacks that measure on them (the diagnostics callback's lookahead affinity); empty
            otherwise.
    """

    index: int
    epoch: int
    losses: dict[str, float | None]
    weights: dict[str, float]
    report: StepReport | None
    applied: bool
    batches: tuple[Batch, ...] = ()


class Callback:
    """Hooks the Trainer calls; override the ones you need. ``key`` names the callback's state
    in checkpoints (the class name unless set)."""

    key: str | None = None
    #: True: ``on_step_end`` reads ``step.report.gramian``. The Trainer then has the engine form G
    #: wherever it forms J (``report_gramian``): a Jacobian method's G is otherwise formed only when read.
    reads_gramian: bool = False

    def on_fit_start(self, trainer: Trainer) -> None:
        """Before the first step (after a resumed run's state is loaded)."""

    def on_step_end(self, trainer: Trainer, step: TrainStep) -> None:
        """After every training step."""

    def on_epoch_end(self, trainer: Trainer, rows: list[dict[str, Any]]) -> None:
        """After validation; ``rows`` are this epoch's metric rows (epoch, split, task, metric, value)."""

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        """After the final evaluation; ``summary`` is what summary.json holds."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    @property
    def state_key(self) -> str:
        return self.key or type(self).__name__


#: callbacks a YAML config can name: ``callbacks: [{name: tensorboard, every: 10}]``
CALLBACKS: Registry[Callback] = Registry("callback")


def callback_class(name: str) -> type[Callback]:
    """A registered callback (``tensorboard``) or one of the user's by import path
    (``my_package.callbacks:PrintLosses``), so a YAML config can name either."""
    if ":" not in name:
        return CALLBACKS.get(name)  # type: ignore[return-value]
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidParameterError(f"callback '{name}': module '{module_name}' cannot be imported ({exc}); "
                                    "expected 'package.module:ClassName' on the Python path") from None
    cls = getattr(module, attribute, None)
    if not (isinstance(cls, type) and issubclass(cls, Callback)):
        raise InvalidParameterError(f"callback '{name}': '{attribute}' in module '{module_name}' is not a "
                                    "polytask.train.Callback subclass")
    return cls


def build_callback(spec: Callback | str | Mapping[str, Any]) -> Callback:
    """A callback object from an instance, a name or ``{"name": NAME_OR_IMPORT_PATH, **params}``."""
    if isinstance(spec, Callback):
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if not (isinstance(spec, Mapping) and isinstance(spec.get("name"), str)):
        raise InvalidParameterError(f"a callback must be a Callback or {{'name': NAME, **params}}; found {spec!r}")
    params = {k: v for k, v in spec.items() if k != "name"}
    cls = callback_class(spec["name"])
    if ":" not in spec["name"]:
        CALLBACKS.check_params(spec["name"], params)
        return CALLBACKS.create(spec["name"], **params)
    try:
        return cls(**params)
    except TypeError as exc:
        raise InvalidParameterError(f"callback '{spec['name']}' does not take these parameters: {exc}") from None
