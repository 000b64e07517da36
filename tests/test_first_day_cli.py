"""Issue 20, "a new user's first day": the command line after the core was reshaped.

A failed ``--overwrite`` keeps the old run (also after a SIGKILL at any moment), a run that
never wrote a checkpoint does not block its folder, a resumed run keeps its baselines and its
training time, silent acceptances and tracebacks became one clear message, ``--help`` and
``--version`` answer without importing torch, and the run directory records its environment.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import polytask.train.rundir as rundir
from polytask.cli.main import main
from polytask.config import load_config
from polytask.core.errors import ConfigError, InvalidParameterError
from polytask.metrics import delta_m
from polytask.models.encoders import CNN, MLP
from polytask.train.callbacks.base import CALLBACKS, Callback
from polytask.train.checkpoint import load_checkpoint
from polytask.train.rundir import RUN_FILES, RunDir

ROOT = Path(__file__).resolve().parents[1]
MULTIMNIST_YAML = ROOT / "examples" / "multimnist.yaml"
HIDDEN = (".replaced-run.moving", ".replaced-run", ".replaced-run.restoring")  # an --overwrite's states (RunDir)

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- helpers
def run_cli(*argv: object) -> tuple[int, str, str]:
    """``polytask ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def assert_clean_error(result: tuple[int, str, str], *needles: str) -> str:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert err.startswith("error: ") and "Traceback" not in err + out, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def table(n: int, seed: int) -> pd.DataFrame:
    r = np.random.default_rng(seed)
    f1, f2 = r.normal(size=n), r.normal(size=n)
    return pd.DataFrame({"f1": f1, "f2": f2, "cat": r.choice(["a", "b", "c"], size=n),
                         "y_reg": 2 * f1 - f2 + 0.1 * r.normal(size=n), "y_bin": (f1 + f2 > 0).astype(int)})


def files_config(folder: Path, **extra: object) -> Path:
    """train.csv, val.csv and cfg.yaml (two tasks, 2 epochs of 5 steps) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    table(300, 0).to_csv(folder / "train.csv", index=False)
    table(120, 1).to_csv(folder / "val.csv", index=False)
    cfg = {"seed": 0, "output_dir": str(folder / "run"),
           "data": {"files": {"train": str(folder / "train.csv"), "val": str(folder / "val.csv")}},
           "tasks": {"reg": {"kind": "regression", "target": "y_reg"}, "bin": {"kind": "binary", "target": "y_bin"}},
           "model": {"encoder": {"name": "mlp", "hidden": [16]}}, "method": {"name": "equal"},
           "train": {"epochs": 2, "batch_size": 64}, "optim": {"lr": 0.01}, "run": {"progress": False}, **extra}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def per_task_config(folder: Path, tests: tuple[str, ...] = ("price", "cut")) -> Path:
    """Two tasks with their own files and columns: price (regression on carat, depth), cut
    (binary on x1..x3); a test file for the tasks in ``tests``."""
    folder.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, dict] = {"price": {"kind": "regression"}, "cut": {"kind": "binary"}}
    for split, n, seed in (("train", 200, 0), ("val", 60, 1), ("test", 60, 2)):
        r = np.random.default_rng(seed)
        a = pd.DataFrame({"carat": r.normal(size=n), "depth": r.normal(size=n)})
        a["price"] = 3 * a["carat"] + 0.1 * r.normal(size=n)
        b = pd.DataFrame({"x1": r.normal(size=n), "x2": r.normal(size=n), "x3": r.normal(size=n)})
        b["cut"] = (b["x1"] > 0).astype(int)
        a.to_csv(folder / f"price_{split}.csv", index=False)
        b.to_csv(folder / f"cut_{split}.csv", index=False)
    for name, spec in tasks.items():
        spec["data"] = {"train": str(folder / f"{name}_train.csv"), "val": str(folder / f"{name}_val.csv")}
        if name in tests:
            spec["data"]["test"] = str(folder / f"{name}_test.csv")
    cfg = {"output_dir": str(folder / "run"), "data": {}, "tasks": tasks,
           "model": {"encoder": {"name": "mlp", "hidden": [16]}}, "train": {"epochs": 1, "batch_size": 64},
           "run": {"progress": False}}
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch run from CSV files (read-only: tests copy it)."""
    folder = tmp_path_factory.mktemp("first_day")
    cfg = files_config(folder)
    code, _, err = run_cli("train", cfg, "--quiet")
    assert code == 0, err
    return folder


@pytest.fixture
def copy(finished, tmp_path):
    """A private copy of ``finished`` whose config points at the copy."""
    folder = tmp_path / "copy"
    shutil.copytree(finished, folder)
    cfg = yaml.safe_load((folder / "cfg.yaml").read_text())
    cfg["output_dir"] = str(folder / "run")
    cfg["data"]["files"] = {"train": str(folder / "train.csv"), "val": str(folder / "val.csv")}
    (folder / "cfg.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    return folder


# ------------------------------------------------------------- 1. --overwrite keeps the old run
def test_overwrite_failing_at_run_time_keeps_the_old_run(copy):
    """Before: the old run was deleted first; `optim.lr=1e6` then failed at step 1 and left nothing."""
    before = snapshot(copy / "run")
    assert_clean_error(run_cli("train", copy / "cfg.yaml", "--quiet", "--overwrite", "--set", "optim.lr=1e6"),
                       "gradient is not finite")
    assert snapshot(copy / "run") == before
    assert not any(p.name.startswith(".replaced-run") for p in (copy / "run").iterdir())


def test_overwrite_replaces_the_old_run_once_the_new_one_has_a_checkpoint(copy):
    (copy / "run" / "notes.txt").write_text("mine")
    code, _, err = run_cli("train", copy / "cfg.yaml", "--quiet", "--overwrite", "--set", "train.epochs=1")
    assert code == 0, err
    run = copy / "run"
    assert json.loads((run / "summary.json").read_text())["epochs_run"] == 1
    assert (run / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".replaced-run") for p in run.iterdir())


class Killed(BaseException):
    """Stands for a SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def _old_run(folder: Path) -> dict[str, bytes]:
    run = RunDir(folder)
    run.checkpoints.mkdir(parents=True)
    for name, text in (("config.yaml", "old: 1\n"), ("metrics.csv", "epoch\n1\n"), ("summary.json", "{}\n"),
                       ("checkpoints/last.pt", "old last"), ("checkpoints/best.pt", "old best"),
                       ("single_task/a/summary.json", "{}\n")):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "notes.txt").write_text("the user's")
    return snapshot(folder)


def _new_run(run: RunDir, *, checkpoint: bool) -> None:
    run.write_text("config.yaml", "new: 1\n")
    run.write_text("steps.csv", "step\n0\n")  # a file the old run did not have
    run.checkpoints.mkdir(exist_ok=True)
    if checkpoint:
        run.write_text("checkpoints/last.pt", "new last")
        run.settle()


def _kill_after(monkeypatch, calls: int) -> None:
    """Make the ``calls``+1-th rename (or removal) of the run directory die like a SIGKILL."""
    count = {"n": 0}
    replace, rmtree = os.replace, shutil.rmtree

    def step(real):
        def wrapped(*args, **kwargs):
            if count["n"] >= calls:
                raise Killed
            count["n"] += 1
            return real(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(os, "replace", step(replace))
    monkeypatch.setattr(shutil, "rmtree", step(rmtree))


@pytest.mark.parametrize("phase", ["set_aside", "new_run", "rollback"])
def test_a_kill_at_every_step_of_an_overwrite_leaves_the_old_or_the_new_run(tmp_path, monkeypatch, phase):
    """Every rename and removal of the replacement, in turn, is where the process dies; the
    recovery (the next `polytask train` in the folder) then finds the old run whole, or the new
    run with its checkpoint and no trace of the old one."""
    outcomes = set()
    for calls in range(40):
        folder = tmp_path / f"{phase}{calls}"
        old = _old_run(folder)
        run = RunDir(folder)
        with monkeypatch.context() as patch:
            if phase == "set_aside":
                _kill_after(patch, calls)
            try:
                run.set_aside()
                if phase == "rollback":
                    _new_run(run, checkpoint=False)
                    _kill_after(patch, calls)
                    run.rollback()
                else:
                    if phase == "new_run":
                        _kill_after(patch, calls)
                    _new_run(run, checkpoint=True)
                finished_ = True
            except Killed:
                finished_ = False
        monkeypatch.setattr(rundir, "_owner", lambda folder: "dead")  # the process that did this is gone
        with pytest.warns(UserWarning) if any((folder / n).exists() for n in HIDDEN) else \
                contextlib.nullcontext():
            run.recover()
        monkeypatch.undo()
        assert not any((folder / n).exists() for n in HIDDEN), calls
        now = snapshot(folder)
        if now == old:
            outcomes.add("old")
        else:
            assert now["checkpoints/last.pt"] == b"new last" and now["config.yaml"] == b"new: 1\n", (calls, now)
            assert now["notes.txt"] == b"the user's" and "summary.json" not in now and "metrics.csv" not in now
            outcomes.add("new")
        if finished_:
            break
    else:
        pytest.fail("the replacement never finished within 40 steps")
    expected = {"set_aside": {"old", "new"}, "new_run": {"old", "new"}, "rollback": {"old"}}[phase]
    assert outcomes == expected


def _train_process(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "polytask", "train", str(config), "--quiet", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_for(process: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None and not ready():
        time.sleep(0.01)
    assert process.poll() is None, process.stderr.read().decode() if process.stderr else ""
    assert ready(), "the condition never came"


def _step(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["step"])
    except Exception:  # not there, or being replaced
        return -1


@pytest.mark.slow
def test_sigkill_during_overwrite_then_the_next_train_finds_the_old_or_the_new_run(copy):
    """A real SIGKILL: before the new run's first checkpoint the old run comes back, after it
    the new run stays (resumable) and the old files go."""
    run = copy / "run"
    before = snapshot(run)
    slow = ["--set", "train.steps_per_epoch=100000", "--set", "train.batch_size=8", "--set", "train.checkpoint_every=400"]
    process = _train_process(copy / "cfg.yaml", "--overwrite", *slow)
    _wait_for(process, lambda: (run / ".replaced-run").exists() and (run / "config.yaml").exists())
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run / "checkpoints" / "last.pt").exists()
    with pytest.warns(UserWarning, match="restored"):
        RunDir(run).recover()
    assert snapshot(run) == before

    process = _train_process(copy / "cfg.yaml", "--overwrite", *slow)
    _wait_for(process, lambda: _step(run / "checkpoints" / "last.pt") >= 400)  # the old run's last.pt is step 10
    process.send_signal(signal.SIGKILL)
    process.wait()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        RunDir(run).recover()  # settled by the process already, or settled now
    assert not (run / ".replaced-run").exists() and not (run / "summary.json").exists()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] >= 400
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["steps_per_epoch"] == 100000


# ------------------------------------------------------- 2. a run with no checkpoint is no run
def test_run_that_failed_before_its_first_checkpoint_does_not_block_its_folder(tmp_path):
    """Before: the rerun said "already exists; pass --resume" and --resume said "last.pt does not exist"."""
    cfg = files_config(tmp_path)
    assert_clean_error(run_cli("train", cfg, "--quiet", "--set", "optim.lr=1e6"), "gradient is not finite")
    assert (tmp_path / "run" / "config.yaml").exists() and not (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    err = assert_clean_error(run_cli("train", cfg, "--quiet", "--resume"), "cannot resume", "stopped before its first checkpoint",
                             "start it again without --resume")
    assert err.count("\n") == 1
    with pytest.warns(UserWarning, match="stopped before its first checkpoint"):
        code, _, err = run_cli("train", cfg, "--quiet", "--set", "train.epochs=1")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["epochs_run"] == 1


# ---------------------------------------------------- 3. a resumed run keeps baselines and time
def test_resume_without_baselines_keeps_them_and_delta_m(tmp_path):
    """Before: summary.json after --resume lost `baselines` and `delta_m`; monitor delta_m was refused even with --baselines."""
    cfg = files_config(tmp_path, train={"epochs": 1, "batch_size": 64, "monitor": "delta_m"})
    code, _, err = run_cli("train", cfg, "--quiet", "--baselines")
    assert code == 0, err
    first = json.loads((tmp_path / "run" / "summary.json").read_text())
    code, out, err = run_cli("train", cfg, "--quiet", "--resume", "--set", "train.epochs=2")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["baselines"] == first["baselines"]
    assert summary["delta_m"] == pytest.approx(delta_m(summary["tasks"], summary["baselines"], summary["main_metrics"]))
    assert "Δm = " in out
    # the summary alone (single_task/ removed) is enough
    shutil.rmtree(tmp_path / "run" / "single_task")
    code, _, err = run_cli("train", cfg, "--quiet", "--resume", "--set", "train.epochs=3")
    assert code == 0, err
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["baselines"] == first["baselines"]


class Crash(Exception):
    pass


@CALLBACKS.register("first_day_slow_then_crash")
class SlowThenCrash(Callback):
    """Half a second inside epoch 2 (before the mid-epoch checkpoint), then a crash."""

    def on_step_end(self, trainer, step):
        if trainer.epoch == 1 and trainer.epoch_step == 1:
            time.sleep(0.5)
        if trainer.epoch == 1 and trainer.epoch_step == 3:
            raise Crash


def test_train_seconds_count_every_segment_including_a_mid_epoch_checkpoint(tmp_path):
    """Before: a mid-epoch checkpoint saved the time up to the last epoch end, so the time of a
    killed epoch was lost from train_seconds."""
    cfg = files_config(tmp_path, train={"epochs": 2, "batch_size": 64, "checkpoint_every": 2})
    with pytest.raises(Crash):
        run_cli("train", cfg, "--quiet", "--set", "callbacks=[first_day_slow_then_crash]")
    saved = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    assert (saved["epoch"], saved["epoch_step"]) == (1, 2)
    assert saved["train_seconds"] >= 0.5
    code, _, err = run_cli("train", cfg, "--quiet", "--resume")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["epochs_run"] == 2 and summary["train_seconds"] >= saved["train_seconds"]


# -------------------------------------------------------------- 4. silent acceptances refused
def test_static_weights_all_zero_are_refused(tmp_path):
    """Before: trained for nothing (every weight 0, total loss 0) and reported the untrained metrics."""
    cfg = files_config(tmp_path)
    assert_clean_error(run_cli("train", cfg, "--quiet", "--set", "method={name: static, weights: {reg: 0, bin: 0}}"),
                       "every task weight 0", "{reg: 0, bin: 0}", "at least one weight > 0")
    assert not (tmp_path / "run").exists()
    assert_clean_error(run_cli("train", cfg, "--quiet", "--set", "method=static", "--set", "tasks.reg.weight=0",
                               "--set", "tasks.bin.weight=0"), "every task weight 0")


def test_warmup_may_still_start_from_zero_static_weights(tmp_path):
    cfg = files_config(tmp_path)
    code, _, err = run_cli("train", cfg, "--quiet", "--set", "train.epochs=1",
                           "--set", "method={name: warmup, inner: equal, steps: 3, weights: {reg: 0, bin: 0}}")
    assert code == 0, err


def test_per_task_test_files_are_the_test_split(tmp_path):
    """Before: tasks.NAME.data.test was read and dropped; `eval --split test` said there was no test split."""
    cfg = per_task_config(tmp_path)
    code, out, err = run_cli("train", cfg, "--quiet")
    assert code == 0, err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["split"] == "test"
    code, out, err = run_cli("eval", tmp_path / "run", "--split", "test")
    assert code == 0, err
    printed = {(line.split()[0], line.split()[1]): float(line.split()[2]) for line in out.splitlines()[2:]}
    assert printed[("price", "r2")] == pytest.approx(summary["tasks"]["price"]["r2"], abs=1e-4)
    # predict --task: only that task's predictions (before: a `cut` column computed through price's stem too)
    pd.read_csv(tmp_path / "price_test.csv").drop(columns=["price"]).head(5).to_csv(tmp_path / "p.csv", index=False)
    code, out, err = run_cli("predict", tmp_path / "run", "--input", tmp_path / "p.csv", "--task", "price")
    assert code == 0, err
    assert out.splitlines()[0] == "id,price" and len(out.splitlines()) == 6
    assert_clean_error(run_cli("predict", tmp_path / "run", "--input", tmp_path / "p.csv", "--task", "pricee"),
                       "--task 'pricee' is not a task", "Did you mean 'price'?")
    assert_clean_error(run_cli("predict", tmp_path / "run", "--input", tmp_path / "p.csv"), "per-task inputs", "--task NAME")


def test_per_task_test_files_for_some_tasks_only_are_refused(tmp_path):
    cfg = per_task_config(tmp_path, tests=("price",))
    assert_clean_error(run_cli("train", cfg, "--quiet"), "tasks.price.data.test is given but tasks.cut.data.test is not")


BASE = {"data": {"files": {"train": "t.csv"}}, "tasks": {"a": {"kind": "binary"}}}


@pytest.mark.parametrize(("raw", "needles"), [
    pytest.param({**BASE, "data": {"files": {"train": "t.csv"}, "options": {"encodin": "codes"}}},
                 ["data: `options` (encodin) are parameters of a bundled `dataset`", "remove data.options"],
                 id="options-beside-files"),
    pytest.param({**BASE, "tasks": {"a": {"kind": "binary", "data": {"train": "a.csv"}}}},
                 ["tasks.a.data: per-task files are read only when `data` has neither `files` nor `dataset`",
                  "found data.files too", "keep one"], id="task-data-beside-files"),
    pytest.param({"data": {"dataset": "adult"}, "tasks": {"income": {"data": {"train": "a.csv"}}}},
                 ["tasks.income.data", "found data.dataset too"], id="task-data-beside-dataset"),
    pytest.param({"data": {"dataset": "adult", "features": ["age"]}},
                 ["`features` picks input columns of data `files`", "remove data.features"], id="features-beside-dataset"),
])
def test_keys_that_would_be_ignored_are_refused(raw, needles):
    """Before: each of these configs trained, ignoring the key."""
    with pytest.raises(ConfigError) as info:
        load_config(raw=raw)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert "\n  config:" not in str(info.value)


# ------------------------------------------------------------ 5. tracebacks → one clear message
def test_output_dir_under_proc_or_a_file_is_one_clear_message(tmp_path):
    """Before: FileNotFoundError / NotADirectoryError tracebacks from mkdir."""
    cfg = files_config(tmp_path)
    assert_clean_error(run_cli("train", cfg, "--quiet", "--set", "output_dir=/proc/polytask_run"),
                       "cannot create the run directory /proc/polytask_run", "choose another output_dir")
    target = tmp_path / "train.csv"
    assert_clean_error(run_cli("train", cfg, "--quiet", "--set", f"output_dir={target}"),
                       f"output_dir {target} is a file", "choose another output_dir")
    assert_clean_error(run_cli("train", cfg, "--quiet", "--set", f"output_dir={target / 'run'}"),
                       f"is inside {target}, which is a file")


def test_predict_with_a_wrong_shape_npy_says_the_expected_shape(finished, tmp_path):
    """Before: RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x3 and 6x16)."""
    np.save(tmp_path / "x.npy", np.zeros((4, 3), dtype=np.float32))
    assert_clean_error(run_cli("predict", finished / "run", "--input", tmp_path / "x.npy"),
                       "holds an array of shape (4, 3)", "reads inputs of shape (N, 6)")
    np.save(tmp_path / "ok.npy", np.zeros((4, 6), dtype=np.float32))
    code, out, err = run_cli("predict", finished / "run", "--input", tmp_path / "ok.npy")
    assert code == 0 and out.splitlines()[0] == "id,reg,bin,bin_probability", err
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    assert_clean_error(run_cli("predict", finished / "run", "--input", tmp_path / "junk.npy"), "cannot be read as a .npy array")


def test_eval_with_a_checkpoint_of_another_model_is_one_clear_message(copy, tmp_path):
    """Before: a RuntimeError traceback listing every size mismatch."""
    other = files_config(tmp_path / "other", model={"encoder": {"name": "mlp", "hidden": [8]}},
                         train={"epochs": 1, "batch_size": 64})
    code, _, err = run_cli("train", other, "--quiet")
    assert code == 0, err
    shutil.copy(tmp_path / "other" / "run" / "checkpoints" / "best.pt", copy / "run" / "checkpoints" / "best.pt")
    err = assert_clean_error(run_cli("eval", copy / "run", "--split", "val"), "does not fit the model", "config.yaml",
                             "size mismatch for encoder.net.0.weight", "and 2 more")
    assert err.count("\n") == 1


def test_tampered_checkpoint_does_not_repeat_torchs_weights_only_advice(copy):
    """Before: the message repeated torch's "Re-running torch.load with weights_only set to False will likely succeed"."""
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"model": {}, "x": Evil()}, copy / "run" / "checkpoints" / "best.pt")
    err = assert_clean_error(run_cli("eval", copy / "run", "--split", "val"), "failed the safe load",
                             "this file was altered or is not one")
    assert "weights_only" not in err and "will likely succeed" not in err


@pytest.fixture(scope="module")
def multimnist_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mm") / "run"
    code, _, err = run_cli("train", MULTIMNIST_YAML, "--quiet", "--set", f"output_dir={folder}", "--set", "train.epochs=1",
                           "--set", "data.options={train_size: 128, val_size: 32, test_size: 32}")
    assert code == 0, err
    return folder


def test_csv_into_an_image_run_says_what_input_the_run_expects(multimnist_run, tmp_path):
    """Before: "this run has per-task inputs: pass --task" (it has not)."""
    table(3, 0).to_csv(tmp_path / "rows.csv", index=False)
    err = assert_clean_error(run_cli("predict", multimnist_run, "--input", tmp_path / "rows.csv"),
                             "reads arrays, not table rows", "data.dataset: multimnist", "(N, 1, 36, 36)")
    assert "per-task" not in err
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 36, 36), dtype=np.float32))
    code, out, err = run_cli("predict", multimnist_run, "--input", tmp_path / "x.npy")
    assert code == 0 and out.splitlines()[0] == "id,left,left_probability,right,right_probability", err


# -------------------------------------------------------------- 6. unclear → clear, or accepted
def test_a_plain_string_names_a_registry_entry():
    """Before: `method: pcgrad` gave "Input should be a valid dictionary or instance of Named"."""
    cfg = load_config(raw={**BASE, "method": "pcgrad", "sampler": "uniform", "task_scheduler": "all",
                           "model": {"encoder": "mlp"}, "callbacks": ["console", {"name": "console", "key": "b"}]})
    assert (cfg.method.name, cfg.method.params) == ("pcgrad", {})
    assert cfg.sampler.name == "uniform" and cfg.model.encoder is not None and cfg.model.encoder.name == "mlp"
    assert [c.name for c in cfg.callbacks] == ["console", "console"]
    # --set into a section written as a plain name
    cfg = load_config(raw={**BASE, "method": "dwa"}, overrides=["method.temperature=3"])
    assert (cfg.method.name, cfg.method.params) == ("dwa", {"temperature": 3})
    assert yaml.safe_load(cfg.to_yaml())["method"] == {"name": "dwa", "temperature": 3}


@pytest.mark.parametrize(("value", "found"), [("16", "found '16' (for one layer of 16 write [16])"),
                                              (16, "found 16 (for one layer of 16 write [16])"),
                                              ([16, "8"], "found [16, '8']"), ([], "needs at least one layer size")])
def test_encoder_layer_sizes_say_a_list_of_ints_is_expected(tmp_path, value, found):
    """Before: `hidden: "16"` said "found ['1', '6']"; `hidden: 16` was a TypeError traceback."""
    with pytest.raises(InvalidParameterError, match="list of positive ints|at least one layer") as info:
        MLP(in_features=3, hidden=value)
    assert found in str(info.value) and "`hidden` of `mlp`" in str(info.value)
    with pytest.raises(InvalidParameterError, match="`channels` of `cnn`"):
        CNN(channels=value)
    cfg = files_config(tmp_path)
    assert_clean_error(run_cli("train", cfg, "--quiet", "--set", f"model.encoder={{name: mlp, hidden: {json.dumps(value)}}}"),
                       found)


# --------------------------------------------------------------- 7. --version, fast --help, list
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["train", "--help"]])
def test_help_and_version_do_not_import_torch(argv):
    """Before: `polytask --help` took 4-7 s importing torch; --version did not exist."""
    probe = ("import sys\nfrom polytask.cli.main import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n"
             "    code = e.code\nprint('TORCH' if 'torch' in sys.modules else 'NO TORCH', code)\n")
    done = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip().splitlines()[-1] == "NO TORCH 0", done.stdout + done.stderr
    if argv == ["--version"]:
        assert done.stdout.startswith(f"polytask 0.1.0 (torch {torch.__version__}, Python ")


def test_list_and_the_models_do_not_import_torchmetrics():
    """Before: `polytask list methods` took ~9 s, 4 of them importing torchmetrics (and through it
    transformers and scipy.signal), which the registries and the models never use. Metrics are
    imported when one is built; the registry still names and describes all of them."""
    probe = ("import sys\nfrom polytask.cli.main import main\nimport polytask.models, polytask.metrics, polytask.train\n"
             "from polytask.metrics import METRICS\nassert 'auroc' in METRICS and METRICS.higher_is_better('rmse') is False\n"
             "code = main(sys.argv[1:])\nprint('TORCHMETRICS' if 'torchmetrics' in sys.modules else 'NO TORCHMETRICS', code)\n")
    done = subprocess.run([sys.executable, "-c", probe, "list"], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "NO TORCHMETRICS 0", done.stdout + done.stderr
    assert "metrics:" in done.stdout and "  auroc" in done.stdout
    # building a metric imports what it needs, through the lazy names as before
    from polytask.core.task import Task
    from polytask.metrics import METRICS, TaskMetrics
    from polytask.train import Trainer

    built = METRICS.build(Task("y", kind="binary", metrics=["auroc", "f1"]))
    assert type(built["auroc"]).__name__ == "BinaryAUROC" and type(built["f1"]).__name__ == "BinaryF1Score"
    assert TaskMetrics.__module__ == "polytask.metrics.tracker" and Trainer.__module__ == "polytask.train.trainer"


def test_list_one_method_shows_its_parameters_and_defaults():
    """Before: `polytask list methods cagrad` was refused (one positional only)."""
    code, out, err = run_cli("list", "methods", "cagrad")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "cagrad (method)" and "Conflict-averse gradient descent" in out
    assert "  needs: gramian" in lines and "parameters:" in lines
    assert "  c: float = 0.4" in lines and "  rescale: bool | int = True" in lines  # or 0, 1, 2 (LibMTL's)
    code, out, _ = run_cli("list", "encoders", "mlp")
    assert code == 0 and "  in_features: int (required)" in out.splitlines()
    code, out, _ = run_cli("list", "methods", "pcgrad")
    assert code == 0 and "parameters: none" in out.splitlines()
    assert_clean_error(run_cli("list", "methods", "pcgard"), "unknown method 'pcgard'", "Did you mean 'pcgrad'?")


# ---------------------------------------------------------------- 8. environment and file modes
def test_run_directory_records_its_environment_segment_by_segment(copy):
    """Before: nothing said which polytask, torch or Python a run used."""
    run = copy / "run"
    assert "environment.json" in RUN_FILES
    first = json.loads((run / "environment.json").read_text())["segments"]
    assert len(first) == 1 and first[0]["from_epoch"] == 0
    env = first[0]
    assert env["polytask"] == "0.1.0" and env["torch"] == torch.__version__
    assert env["python"] == ".".join(map(str, sys.version_info[:3])) and env["host"]
    git = env.get("git") or env.get("polytask_git")
    if shutil.which("git") and (ROOT / ".git").exists():
        assert git is not None and len(git["commit"]) == 40 and isinstance(git["dirty"], bool)
    code, _, err = run_cli("train", copy / "cfg.yaml", "--quiet", "--resume", "--set", "train.epochs=3")
    assert code == 0, err
    segments = json.loads((run / "environment.json").read_text())["segments"]
    assert len(segments) == 2 and segments[0] == env and segments[1]["from_epoch"] == 2


def test_run_files_follow_the_umask_like_other_outputs(tmp_path):
    """Before: every run file was 0600 (mkstemp's mode), unreadable by the user's group."""
    cfg = files_config(tmp_path, train={"epochs": 1, "batch_size": 64})
    old = os.umask(0o027)
    try:
        code, _, err = run_cli("train", cfg, "--quiet")
    finally:
        os.umask(old)
    assert code == 0, err
    for path in (tmp_path / "run").rglob("*"):
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o640, path


def test_nan_baselines_survive_a_resume_as_nan(tmp_path):
    """strict JSON writes NaN as null; the kept baselines read it back as NaN."""
    run = RunDir(tmp_path)
    run.write_json("summary.json", {"baselines": {"a": {"r2": math.nan, "mae": 1.0}}})
    from polytask.cli.pipeline import previous_baselines
    from polytask.core.task import Task

    kept = previous_baselines(run, [Task("a", kind="regression")])
    assert math.isnan(kept["a"]["r2"]) and kept["a"]["mae"] == 1.0


def test_a_restored_run_keeps_none_of_the_new_runs_cut_short_atomic_writes(tmp_path):
    """A kill inside an atomic write leaves its temporary file (`.NAME.XXXX.tmp`): restoring the
    replaced run removes it with the rest of the new run's files, and leaves other files alone."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "config.yaml").write_text("old: 1\n")
    (run.path / "notes.txt").write_text("the user's own file")
    run.set_aside()
    (run.path / "config.yaml").write_text("new: 1\n")
    (run.path / ".environment.json.k2j4.tmp").write_bytes(b"")
    (run.path / ".notes.txt.swp.tmp").write_bytes(b"not ours")
    run.rollback()
    assert sorted(p.name for p in run.path.iterdir()) == [".notes.txt.swp.tmp", "config.yaml", "notes.txt"]
    assert (run.path / "config.yaml").read_text() == "old: 1\n"
