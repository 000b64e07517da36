"""MLflow logging as a callback: ``callbacks: [{name: mlflow, experiment: adult}]``.

An optional extra (``pip install 'polytask[mlflow]'``): ``mlflow-skinny`` (the client, no
server, no torch) with SQLAlchemy and Alembic for the default local store.

Where the run goes: ``tracking_uri`` if given, else ``$MLFLOW_TRACKING_URI`` if set, else a
SQLite store inside the run directory, ``sqlite:///<run dir>/mlflow/mlflow.db``, with its
artifacts in ``<run dir>/mlflow/artifacts`` (MLflow 3 refuses its old ``file:`` store unless
``MLFLOW_ALLOW_FILE_STORE`` is set, and SQLite is the local store it recommends). Browse it with
``mlflow ui --backend-store-uri sqlite:///<run dir>/mlflow/mlflow.db``.

What is logged, all with ``step=`` the trainer's global step:

* params ``method`` and ``tasks`` (a new run only: MLflow params cannot change), tag
  ``polytask.run_dir``; artifacts ``config.yaml`` (``trainer.config_text``, when set) and
  ``summary.json``;
* ``loss/<task>`` and ``weight/<task>`` every ``every``-th step;
* ``health/<kind>/<name>`` for each row of ``trainer.health.rows``, at its own step;
* ``<split>/<task>/<metric>`` and ``lr/group<i>`` each epoch, at the epoch's last step;
* ``final/<task>/<metric>`` (and ``final/delta_m``) at the end of the fit, which also ends the run.

MLflow accepts only letters, digits and ``_ - . / space`` in a key: any other character of a
task, layer or metric name becomes ``_`` (a cosine row ``a~b`` is ``health/cosine/a_b``).
"""

from __future__ import annotations

import json
import os
import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from polytask.core.errors import InvalidParameterError, MissingDependencyError
from polytask.train.callbacks.base import CALLBACKS
from polytask.train.callbacks.scalars import ScalarLogger
from polytask.train.rundir import strict_json

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run
    from mlflow.tracking import MlflowClient

    from polytask.train.trainer import Trainer

INSTALL = "pip install 'polytask[mlflow]'  (or: pip install mlflow-skinny sqlalchemy alembic)"
#: MLflow's own cap on the metrics of one log_batch call
BATCH = 1000
_BAD_KEY_CHARS = re.compile(r"[^\w.\- /]")


def _require(module: str, why: str) -> None:
    try:
        __import__(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the 'mlflow' callback needs the '{module}' package{why}, which is not installed; install it with: {INSTALL}"
        ) from exc


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow rejects in a metric key replaced by ``_``."""
    return _BAD_KEY_CHARS.sub("_", name)


@CALLBACKS.register("mlflow")
class MLflowLogger(ScalarLogger):
    """Log params, per-task losses, task weights, metrics, learning rates and gradient health to MLflow.

    Args:
        tracking_uri: the MLflow tracking URI; default ``$MLFLOW_TRACKING_URI`` or a SQLite store
            in the run directory (see the module's docstring).
        experiment: the experiment's name (created when missing).
        run_name: the MLflow run's name; default the run directory's name.
        every: log the per-step metrics (losses, weights) every this many steps; epoch metrics
            and gradient-health rows are always logged.

    Only the main data-parallel rank logs. The run's id is kept in the checkpoint, so a resumed
    run continues the same MLflow run; a metric already logged at a step (by the crashed run,
    past its checkpoint) is not logged there again.
    """

    key = "mlflow"  # the checkpoint's name for this callback's state, stable across renames

    def __init__(self, *, tracking_uri: str | None = None, experiment: str = "polytask", run_name: str | None = None,
                 every: int = 1) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidParameterError(f"mlflow: 'every' must be an integer >= 1, found {every!r}")
        if not experiment:
            raise InvalidParameterError("mlflow: 'experiment' must be a non-empty name")
        # checked at construction: a config naming this callback fails before training starts
        _require("mlflow", "")
        if tracking_uri is None and not os.environ.get("MLFLOW_TRACKING_URI"):
            for module in ("sqlalchemy", "alembic"):  # the local SQLite store needs both; a server does not
                _require(module, " for the local SQLite store (or give a tracking_uri)")
        self.tracking_uri, self.experiment, self.run_name, self.every = tracking_uri, experiment, run_name, every
        self.client: MlflowClient | None = None
        self.run_id: str | None = None
        self._pending: list[Metric] = []
        self._logged: dict[str, int] = {}  # key -> last step the run already has (a resumed run's leftovers)
        self._health_step = -1
        self._last_step: int | None = None
        self._lrs: list[float] | None = None

    # ------------------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer) -> None:
        if not trainer.is_main:
            return
        from mlflow.tracking import MlflowClient

        uri, artifacts = self._resolve(trainer)
        self.client = MlflowClient(tracking_uri=uri)
        run = self._reopen() if self.run_id is not None else None
        if run is None:
            run = self._create(trainer, artifacts)
        self.run_id = run.info.run_id
        start = int(trainer.step_index)
        self._health_step = start - 1  # rows before `start` came back with the checkpoint, already logged
        self._last_step, self._lrs, self._pending = None, None, []
        if trainer.config_text is not None:  # rewritten on resume: the resumed config is the one in force
            self.client.log_text(self.run_id, trainer.config_text, "config.yaml")

    def _active(self) -> bool:
        return self.client is not None

    def on_fit_end(self, trainer: Trainer, summary: dict[str, Any]) -> None:
        if self.client is None or self.run_id is None:
            return
        self._log_final(trainer, summary)
        self.client.log_text(self.run_id, json.dumps(strict_json(summary), indent=2, default=str, allow_nan=False),
                             "summary.json")  # strict JSON, as the run directory's (non-finite → null)
        self.client.set_terminated(self.run_id, status="FINISHED")
        self.client = None  # run_id stays: a checkpoint written after this still names the run

    def state_dict(self) -> dict[str, Any]:
        # A checkpoint is being taken: what it covers must be on the server, since a run resumed
        # from it starts after these steps and never logs them again.
        self._flush()
        return {"run_id": self.run_id} if self.run_id is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.run_id = state.get("run_id")

    # ---------------------------------------------------------------------------- helpers
    def _resolve(self, trainer: Trainer) -> tuple[str, str | None]:
        """The tracking URI, and the artifact location for a new experiment (None: the store's default)."""
        if self.tracking_uri is not None:
            return self.tracking_uri, None
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"], None
        if trainer.run_dir is None:
            raise InvalidParameterError(
                "mlflow: this trainer writes no run directory, so there is no default local store; "
                "give the callback a tracking_uri (or set MLFLOW_TRACKING_URI), or the trainer a run directory"
            )
        folder = (Path(trainer.run_dir) / "mlflow").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        # the artifact root is set explicitly: SQLite's default is ./mlruns under the working directory
        return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()

    def _reopen(self) -> Run | None:
        """The checkpoint's MLflow run, marked running again; None (with a warning) when this store lacks it."""
        from mlflow.exceptions import MlflowException

        assert self.client is not None and self.run_id is not None
        try:
            run = self.client.get_run(self.run_id)
        except MlflowException:
            warnings.warn(f"mlflow: the checkpoint's run {self.run_id} is not in this tracking store; "
                          "the resumed run is logged as a new MLflow run", stacklevel=2)
            return None
        self.client.update_run(self.run_id, status="RUNNING")
        # The crashed run may have logged steps past its checkpoint and MLflow cannot delete
        # metric values: note how far each key got so that the replayed steps are not logged twice.
        self._logged = {key: max((m.step for m in self.client.get_metric_history(self.run_id, key)), default=-1)
                        for key in run.data.metrics}
        return run

    def _create(self, trainer: Trainer, artifacts: str | None) -> Run:
        from mlflow.entities import Param

        assert self.client is not None
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            experiment_id = self.client.create_experiment(self.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
            if experiment.lifecycle_stage == "deleted":  # its name stays taken: a new run must go there
                self.client.restore_experiment(experiment_id)
        tags = {"polytask.run_dir": str(trainer.run_dir)} if trainer.run_dir is not None else {}
        name = self.run_name or (Path(trainer.run_dir).name if trainer.run_dir is not None else None)
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self._logged = {}
        params = [Param("method", str(trainer.method_name)), Param("tasks", ",".join(trainer.names))]
        self.client.log_batch(run.info.run_id, params=params)
        return run

    def _scalar(self, name: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        key = metric_key(name)
        if step <= self._logged.get(key, -1):
            return
        self._pending.append(Metric(key, float(value), int(time.time() * 1000), int(step)))
        if len(self._pending) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        # one batched call per epoch (or per BATCH values) instead of one request per value
        if self.client is None or self.run_id is None or not self._pending:
            return
        for i in range(0, len(self._pending), BATCH):
            self.client.log_batch(self.run_id, metrics=self._pending[i:i + BATCH])
        self._pending = []
