"""Distillation from YAML and the CLI: the `distill:` section, `polytask teachers`, stale caches, bad teachers."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from polytask.cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")


def run_cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def clean_error(result: tuple[int, str, str], *needles: str) -> str:
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


def config(folder: Path, name: str = "cfg.yaml", train_seed: int = 0, **extra: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    table(300, train_seed).to_csv(folder / f"train{train_seed}.csv", index=False)
    table(120, 1).to_csv(folder / "val.csv", index=False)
    cfg = {"seed": 0, "output_dir": str(folder / "run"),
           "data": {"files": {"train": str(folder / f"train{train_seed}.csv"), "val": str(folder / "val.csv")}},
           "tasks": {"reg": {"kind": "regression", "target": "y_reg"}, "bin": {"kind": "binary", "target": "y_bin"}},
           "model": {"encoder": {"name": "mlp", "hidden": [16]}}, "method": {"name": "equal"},
           "train": {"epochs": 2, "batch_size": 64}, "optim": {"lr": 0.01}, "run": {"progress": False}, **extra}
    path = folder / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.mark.slow
def test_a_distill_section_trains_teachers_then_the_student(tmp_path) -> None:
    cfg = config(tmp_path, distill={"anneal": "linear", "temperature": 2.0, "features": {"lr": 0.02}},
                 method={"name": "uncertainty"})
    code, out, err = run_cli("train", cfg, "--quiet")
    assert code == 0, err
    run = tmp_path / "run"
    assert (run / "single_task" / "bin" / "summary.json").exists() and (run / "teachers" / "cache.pt").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["baselines"]) == {"reg", "bin"} and "delta_m" in summary  # Δm against the teachers
    steps = pd.read_csv(run / "steps.csv")
    assert {"bin:kd", "reg:kd", "bin:feat", "reg:feat"} <= set(steps["task"])
    assert yaml.safe_load((run / "config.yaml").read_text())["distill"]["temperature"] == 2.0


def test_polytask_teachers_then_students_and_a_cache_of_other_data_is_refused(tmp_path) -> None:
    cfg = config(tmp_path)
    teachers = tmp_path / "teachers"
    code, out, err = run_cli("teachers", cfg, "--output", teachers)
    assert code == 0, err
    assert "teacher bin" in out and (teachers / "teachers" / "cache.pt").exists()
    student = config(tmp_path, "student.yaml", distill={"teachers": str(teachers)})
    code, out, err = run_cli("train", student, "--quiet")
    assert code == 0, err
    assert not (tmp_path / "run" / "single_task").exists()  # the teachers came from the folder
    before = snapshot(tmp_path / "run")
    cache_before = (teachers / "teachers" / "cache.pt").read_bytes()
    # the same teachers and cache, other training rows: refused, the existing run untouched
    other = config(tmp_path, "other.yaml", train_seed=7, distill={"teachers": str(teachers)})
    clean_error(run_cli("train", other, "--overwrite", "--quiet"), "task '", "was built from other data")
    assert snapshot(tmp_path / "run") == before
    assert (teachers / "teachers" / "cache.pt").read_bytes() == cache_before


def test_bad_teachers_are_one_clear_error_and_change_nothing(tmp_path) -> None:
    cfg = config(tmp_path)
    assert run_cli("train", cfg, "--quiet")[0] == 0
    before = snapshot(tmp_path / "run")
    missing = config(tmp_path, "missing.yaml", distill={"teachers": {"bin": str(tmp_path / "nowhere")}})
    clean_error(run_cli("train", missing, "--overwrite", "--quiet"), "task 'bin'", "does not exist")
    unknown = config(tmp_path, "unknown.yaml", distill={"teachers": {"bni": str(tmp_path / "run")}})
    clean_error(run_cli("train", unknown, "--overwrite", "--quiet"), "unknown task 'bni'", "bin")
    # a teacher run whose checkpoint is corrupt
    teacher = tmp_path / "run"
    (tmp_path / "copy").mkdir()
    corrupt = tmp_path / "copy" / "teacher"
    import shutil

    shutil.copytree(teacher, corrupt)
    (corrupt / "checkpoints" / "best.pt").write_bytes(b"garbage")
    bad = config(tmp_path, "bad.yaml", distill={"teachers": {"bin": str(corrupt)}})
    clean_error(run_cli("train", bad, "--overwrite", "--quiet"), "best.pt")
    assert snapshot(tmp_path / "run") == before


def test_polytask_list_shows_distillation_objectives_and_schedules() -> None:
    code, out, _ = run_cli("list", "distillation")
    assert code == 0 and "output" in out and "feature" in out
    code, out, _ = run_cli("list", "annealing", "exponential")
    assert code == 0 and "rate" in out and "5.0" in out
    code, out, _ = run_cli("list")
    assert "annealing:" in out and "linear" in out
