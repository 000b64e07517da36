"""The optional TensorBoard and MLflow callbacks, read back with the tools' own readers.

The callbacks are driven hook by hook with a small stand-in trainer (the attributes the callback
contract promises, a real torch optimizer) and real TrainStep objects; what they wrote is read
back with TensorBoard's EventAccumulator and MLflow's client on the local store, and checked
tag by tag, step by step, value by value.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from polytask.core.errors import InvalidParameterError, MissingDependencyError
from polytask.train.callbacks.base import CALLBACKS, TrainStep
from polytask.train.callbacks.mlflow import MLflowLogger
from polytask.train.callbacks.tensorboard import TensorBoardLogger

# MLflow's SQLite store still uses a loader SQLAlchemy 2.1 deprecates: theirs to fix, not a failure here
pytestmark = pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")

CONFIG = "method: pcgrad\ntasks:\n  - name: a\n  - name: b\n"
SUMMARY = {"tasks": {"a": {"accuracy": 0.75}, "b": {"mae": 0.25}}, "split": "test", "delta_m": 1.5}


# ------------------------------------------------------------------------------------- helpers
def make_trainer(run_dir: Path | None, *, is_main: bool = True) -> SimpleNamespace:
    """The trainer attributes the loggers read, with a real two-group optimizer."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 0.1}, {"params": [model.bias], "lr": 0.01}])
    return SimpleNamespace(run_dir=run_dir, is_main=is_main, optimizer=optimizer, health=SimpleNamespace(rows=[]),
                           names=["a", "b"], method_name="pcgrad", config_text=CONFIG, epoch=0, step_index=0)


def loss(task: str, i: int, shift: float = 0.0) -> float | None:
    """Task b has no labelled sample on step 1: its loss is None there."""
    if task == "b" and i == 1:
        return None
    return 1.0 / (i + 1) + (0.5 if task == "b" else 0.0) + shift


def weight(task: str, i: int) -> float:
    return 1.0 + 0.1 * i if task == "a" else 1.0 - 0.1 * i


def health_rows(i: int) -> list[dict[str, Any]]:
    """What the monitor appends: the total norm every step, the detailed rows on steps 0 and 3."""
    rows = [{"step": i, "kind": "total_norm", "name": "all", "value": 1.0 + i}]
    if i in (0, 3):
        rows += [{"step": i, "kind": "layer_norm", "name": "enc.weight", "value": 0.5 + i},
                 {"step": i, "kind": "task_norm", "name": "a", "value": 2.0 + i},
                 {"step": i, "kind": "task_norm", "name": "b", "value": 3.0 + i},
                 {"step": i, "kind": "cosine", "name": "a~b", "value": -0.25 + 0.1 * i}]
    return rows


def run_steps(callback: Any, trainer: SimpleNamespace, steps: range, epoch: int, shift: float = 0.0) -> None:
    """Steps as the trainer runs them: the monitor's rows inside the step, the step counter moved on,
    then the hook."""
    for i in steps:
        trainer.health.rows.extend(health_rows(i))
        trainer.step_index = i + 1
        losses = {t: loss(t, i, shift) for t in ("a", "b")}
        callback.on_step_end(trainer, TrainStep(index=i, epoch=epoch, losses=losses,
                                                weights={t: weight(t, i) for t in ("a", "b")}, report=None, applied=True))


def epoch_rows(epoch: int) -> list[dict[str, Any]]:
    return [{"epoch": epoch, "split": "train", "task": "a", "metric": "loss", "value": 0.9 - 0.1 * epoch},
            {"epoch": epoch, "split": "val", "task": "a", "metric": "accuracy", "value": 0.5 + 0.1 * epoch},
            {"epoch": epoch, "split": "val", "task": "b", "metric": "mae", "value": 0.3 - 0.05 * epoch}]


def end_epoch(callback: Any, trainer: SimpleNamespace, epoch: int) -> None:
    """The trainer's epoch end: a scheduler halves the rates before the callbacks run."""
    for group in trainer.optimizer.param_groups:
        group["lr"] *= 0.5
    trainer.epoch = epoch + 1
    callback.on_epoch_end(trainer, epoch_rows(epoch))


def read_scalars(directory: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def read_text(directory: Path, tag: str) -> list[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"tensors": 0})
    events.Reload()
    return [t.tensor_proto.string_val[0].decode() for t in events.Tensors(f"{tag}/text_summary")]


def approx(pairs: list[tuple[int, float]]) -> list[Any]:
    """TensorBoard stores float32: compare values to that precision, steps exactly."""
    return [(step, pytest.approx(value, rel=1e-6, abs=1e-7)) for step, value in pairs]


def expected_health(steps: range) -> dict[str, list[tuple[int, float]]]:
    tags: dict[str, list[tuple[int, float]]] = {}
    for i in steps:
        for row in health_rows(i):
            tags.setdefault(f"health/{row['kind']}/{row['name']}", []).append((i, row["value"]))
    return tags


@pytest.fixture
def no_env_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    """The default store is the run directory's only when MLFLOW_TRACKING_URI is unset."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow' / 'mlflow.db').resolve()}")


def history(client: Any, run_id: str) -> dict[str, list[tuple[int, float]]]:
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in run.data.metrics}


def _next_second() -> None:
    """Wait for the wall clock's next second. Event files are read in name order and a name starts
    with its creation second, then a per-process counter: two writers of one process in one second
    could sort 10 before 9. A real resume is a later process, at a later second."""
    now = int(time.time())
    while int(time.time()) == now:
        time.sleep(0.02)


# --------------------------------------------------------------------------------- TensorBoard
def test_tensorboard_logs_losses_weights_metrics_lr_health_and_final(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path / "run")
    callback = CALLBACKS.create("tensorboard", every=2)
    assert isinstance(callback, TensorBoardLogger)
    callback.on_fit_start(trainer)
    run_steps(callback, trainer, range(0, 3), epoch=0)
    end_epoch(callback, trainer, 0)
    run_steps(callback, trainer, range(3, 6), epoch=1)
    end_epoch(callback, trainer, 1)
    callback.on_fit_end(trainer, SUMMARY)

    directory = tmp_path / "run" / "tensorboard"  # the default log_dir
    scalars = read_scalars(directory)
    expected = {
        # every=2: the step scalars of steps 0, 2, 4; b's None loss on step 1 would be skipped anyway
        "loss/a": [(i, loss("a", i)) for i in (0, 2, 4)],
        "loss/b": [(i, loss("b", i)) for i in (0, 2, 4)],
        "weight/a": [(i, weight("a", i)) for i in (0, 2, 4)],
        "weight/b": [(i, weight("b", i)) for i in (0, 2, 4)],
        # epoch scalars at each epoch's last step (2 and 5)
        "train/a/loss": [(2, 0.9), (5, 0.8)],
        "val/a/accuracy": [(2, 0.5), (5, 0.6)],
        "val/b/mae": [(2, 0.3), (5, 0.25)],
        # the rates the epoch's steps used, not the halved ones the scheduler left at its end
        "lr/group0": [(2, 0.1), (5, 0.05)],
        "lr/group1": [(2, 0.01), (5, 0.005)],
        "final/a/accuracy": [(5, 0.75)],
        "final/b/mae": [(5, 0.25)],
        "final/delta_m": [(5, 1.5)],
        **expected_health(range(6)),  # every health row, whatever `every`, at its own step
    }
    assert sorted(scalars) == sorted(expected)
    for tag, pairs in expected.items():
        assert scalars[tag] == approx(pairs), tag
    assert read_text(directory, "method") == ["pcgrad"]
    assert read_text(directory, "config") == ["\n".join("    " + line for line in CONFIG.splitlines())]


def test_tensorboard_resume_purges_replayed_steps_instead_of_duplicating(tmp_path: Path) -> None:
    """The run checkpoints after epoch 0 (step 3), logs steps 4-5 and dies; the resumed run replays 4-5."""
    trainer = make_trainer(tmp_path / "run")
    first = TensorBoardLogger()
    first.on_fit_start(trainer)
    run_steps(first, trainer, range(0, 4), epoch=0)
    end_epoch(first, trainer, 0)
    checkpoint = {"callback": first.state_dict(), "step": trainer.step_index, "rows": list(trainer.health.rows),
                  "lrs": [g["lr"] for g in trainer.optimizer.param_groups]}
    run_steps(first, trainer, range(4, 6), epoch=1, shift=100.0)  # what the crashed run left behind
    first.state_dict()  # its events reached the disk (a later checkpoint the resume could not read)
    _next_second()

    resumed = make_trainer(tmp_path / "run")
    resumed.step_index, resumed.epoch, resumed.health.rows = checkpoint["step"], 1, list(checkpoint["rows"])
    for group, lr in zip(resumed.optimizer.param_groups, checkpoint["lrs"]):
        group["lr"] = lr
    second = TensorBoardLogger()
    second.load_state_dict(checkpoint["callback"])
    second.on_fit_start(resumed)
    run_steps(second, resumed, range(4, 6), epoch=1)
    end_epoch(second, resumed, 1)
    second.on_fit_end(resumed, SUMMARY)

    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    for task in ("a", "b"):  # each step once, the replayed steps with the resumed run's values
        assert scalars[f"loss/{task}"] == approx([(i, loss(task, i)) for i in range(6) if loss(task, i) is not None])
        assert scalars[f"weight/{task}"] == approx([(i, weight(task, i)) for i in range(6)])
    for tag, pairs in expected_health(range(6)).items():
        assert scalars[tag] == approx(pairs), tag
    assert scalars["val/a/accuracy"] == approx([(3, 0.5), (5, 0.6)])
    assert scalars["lr/group0"] == approx([(3, 0.1), (5, 0.05)])
    assert read_text(tmp_path / "run" / "tensorboard", "method") == ["pcgrad", "pcgrad"]  # one per fit start


def test_tensorboard_explicit_dir_other_ranks_and_no_run_dir(tmp_path: Path) -> None:
    # an explicit log_dir is used as is
    trainer = make_trainer(None)
    callback = TensorBoardLogger(log_dir=str(tmp_path / "tb"))
    callback.on_fit_start(trainer)
    run_steps(callback, trainer, range(0, 1), epoch=0)
    callback.on_fit_end(trainer, {})
    assert read_scalars(tmp_path / "tb")["loss/a"] == approx([(0, 1.0)])
    # a non-zero data-parallel rank writes nothing
    other = make_trainer(tmp_path / "rank1", is_main=False)
    quiet = TensorBoardLogger()
    quiet.on_fit_start(other)
    run_steps(quiet, other, range(0, 2), epoch=0)
    end_epoch(quiet, other, 0)
    assert quiet.state_dict() == {}
    quiet.on_fit_end(other, SUMMARY)
    assert not (tmp_path / "rank1").exists()
    # no run directory and no log_dir: no silent no-op
    with pytest.raises(InvalidParameterError, match="log_dir"):
        TensorBoardLogger().on_fit_start(make_trainer(None))
    with pytest.raises(InvalidParameterError, match="every"):
        TensorBoardLogger(every=0)
    with pytest.raises(InvalidParameterError, match="Did you mean 'every'"):
        CALLBACKS.create("tensorboard", evry=2)


def test_tensorboard_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what `import tensorboard` meets when it is not installed
    with pytest.raises(MissingDependencyError) as info:
        TensorBoardLogger()
    assert "pip install 'polytask[tensorboard]'" in str(info.value)
    assert "pip install tensorboard" in str(info.value)


# ------------------------------------------------------------------------------------- MLflow
@pytest.mark.slow
def test_mlflow_logs_params_metrics_artifacts_and_ends_the_run(tmp_path: Path, no_env_uri: None) -> None:
    trainer = make_trainer(tmp_path / "run")
    callback = CALLBACKS.create("mlflow", experiment="unit", every=2)
    assert isinstance(callback, MLflowLogger)
    callback.on_fit_start(trainer)
    run_steps(callback, trainer, range(0, 3), epoch=0)
    end_epoch(callback, trainer, 0)
    run_steps(callback, trainer, range(3, 6), epoch=1)
    end_epoch(callback, trainer, 1)
    callback.on_fit_end(trainer, SUMMARY)

    client = mlflow_client(tmp_path / "run")
    experiment = client.get_experiment_by_name("unit")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == callback.run_id
    assert run.info.run_name == "run"  # the run directory's name
    assert run.info.status == "FINISHED"
    assert run.data.params == {"method": "pcgrad", "tasks": "a,b"}
    assert run.data.tags["polytask.run_dir"] == str(tmp_path / "run")
    expected = {
        "loss/a": [(i, loss("a", i)) for i in (0, 2, 4)],
        "loss/b": [(i, loss("b", i)) for i in (0, 2, 4)],
        "weight/a": [(i, weight("a", i)) for i in (0, 2, 4)],
        "weight/b": [(i, weight("b", i)) for i in (0, 2, 4)],
        "train/a/loss": [(2, 0.9), (5, 0.8)],
        "val/a/accuracy": [(2, 0.5), (5, 0.6)],
        "val/b/mae": [(2, 0.3), (5, 0.25)],
        "lr/group0": [(2, 0.1), (5, 0.05)],
        "lr/group1": [(2, 0.01), (5, 0.005)],
        "final/a/accuracy": [(5, 0.75)],
        "final/b/mae": [(5, 0.25)],
        "final/delta_m": [(5, 1.5)],
        # MLflow rejects '~' in a key: the cosine row a~b is logged as a_b
        **{tag.replace("~", "_"): pairs for tag, pairs in expected_health(range(6)).items()},
    }
    got = history(client, run.info.run_id)
    assert sorted(got) == sorted(expected)
    for key, pairs in expected.items():
        assert got[key] == [(s, pytest.approx(v, rel=1e-12)) for s, v in pairs], key
    # artifacts live in the run directory, not under the working directory
    artifacts = Path(client.download_artifacts(run.info.run_id, "", str(tmp_path / "download")))
    assert (artifacts / "config.yaml").read_text() == CONFIG
    assert json.loads((artifacts / "summary.json").read_text()) == SUMMARY
    assert (tmp_path / "run" / "mlflow" / "artifacts").is_dir()


def test_mlflow_resume_continues_the_run_without_duplicate_steps(tmp_path: Path, no_env_uri: None) -> None:
    """Checkpoint after epoch 0 (step 3); steps 4-5 reach MLflow, the process dies; the resume replays
    4-5 (an exact resume gives the same values) into the same MLflow run."""
    trainer = make_trainer(tmp_path / "run")
    first = MLflowLogger(run_name="resumable")
    first.on_fit_start(trainer)
    run_steps(first, trainer, range(0, 4), epoch=0)
    end_epoch(first, trainer, 0)
    checkpoint = {"callback": first.state_dict(), "step": trainer.step_index, "rows": list(trainer.health.rows),
                  "lrs": [g["lr"] for g in trainer.optimizer.param_groups]}
    assert checkpoint["callback"] == {"run_id": first.run_id}
    run_steps(first, trainer, range(4, 6), epoch=1)
    first.state_dict()  # flushed: the crashed run's steps 4-5 are in the store

    resumed = make_trainer(tmp_path / "run")
    resumed.step_index, resumed.epoch, resumed.health.rows = checkpoint["step"], 1, list(checkpoint["rows"])
    for group, lr in zip(resumed.optimizer.param_groups, checkpoint["lrs"]):
        group["lr"] = lr
    second = MLflowLogger(run_name="resumable")
    second.load_state_dict(checkpoint["callback"])
    second.on_fit_start(resumed)
    assert second.run_id == first.run_id
    run_steps(second, resumed, range(4, 6), epoch=1)
    end_epoch(second, resumed, 1)
    second.on_fit_end(resumed, SUMMARY)

    client = mlflow_client(tmp_path / "run")
    (run,) = client.search_runs([client.get_experiment_by_name("polytask").experiment_id])
    assert run.info.run_id == first.run_id and run.info.status == "FINISHED"
    got = history(client, run.info.run_id)
    for task in ("a", "b"):  # each step exactly once
        assert got[f"loss/{task}"] == [(i, loss(task, i)) for i in range(6) if loss(task, i) is not None]
        assert got[f"weight/{task}"] == [(i, pytest.approx(weight(task, i))) for i in range(6)]
    assert got["health/total_norm/all"] == [(i, 1.0 + i) for i in range(6)]
    assert got["health/cosine/a_b"] == [(0, -0.25), (3, pytest.approx(0.05))]
    assert got["val/a/accuracy"] == [(3, 0.5), (5, 0.6)]
    assert got["lr/group0"] == [(3, 0.1), (5, 0.05)]

    # a checkpoint naming a run this store does not have: a warning and a new run, not a crash
    stray = MLflowLogger(experiment="elsewhere")
    stray.load_state_dict({"run_id": "f" * 32})
    with pytest.warns(UserWarning, match="not in this tracking store"):
        stray.on_fit_start(resumed)
    assert stray.run_id not in (None, "f" * 32)
    assert client.get_run(stray.run_id).info.experiment_id == client.get_experiment_by_name("elsewhere").experiment_id


def test_mlflow_other_ranks_no_run_dir_and_missing_packages(tmp_path: Path, no_env_uri: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    other = make_trainer(tmp_path / "rank1", is_main=False)
    quiet = MLflowLogger()
    quiet.on_fit_start(other)
    run_steps(quiet, other, range(0, 2), epoch=0)
    end_epoch(quiet, other, 0)
    quiet.on_fit_end(other, SUMMARY)
    assert quiet.state_dict() == {} and not (tmp_path / "rank1").exists()
    with pytest.raises(InvalidParameterError, match="tracking_uri"):
        MLflowLogger().on_fit_start(make_trainer(None))

    monkeypatch.setitem(sys.modules, "sqlalchemy", None)
    with pytest.raises(MissingDependencyError, match="sqlalchemy") as info:
        MLflowLogger()  # the default local store needs it ...
    assert "pip install 'polytask[mlflow]'" in str(info.value)
    MLflowLogger(tracking_uri="http://127.0.0.1:5000")  # ... a tracking server does not
    monkeypatch.setitem(sys.modules, "mlflow", None)
    with pytest.raises(MissingDependencyError) as info:
        MLflowLogger(tracking_uri="http://127.0.0.1:5000")
    assert "pip install 'polytask[mlflow]'" in str(info.value)
    assert "pip install mlflow-skinny" in str(info.value)


# ------------------------------------------------------------------------------------ imports
@pytest.mark.slow
def test_importing_the_logger_modules_registers_them_without_importing_the_packages() -> None:
    code = ("import sys, polytask, polytask.train.callbacks.tensorboard, polytask.train.callbacks.mlflow\n"
            "from polytask.train.callbacks.base import CALLBACKS\n"
            "assert 'tensorboard' in CALLBACKS and 'mlflow' in CALLBACKS\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('tensorboard', 'mlflow')\n"
            "          or m.startswith('torch.utils.tensorboard')]\n"
            "assert not loaded, loaded\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
