"""`polytask bench speed`: its rows, and that the memory column still counts J where the engine
keeps J's storage between steps (it is released before each variant's memory measurement)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow  # a subprocess timing the benchmark MLP (J of T=2 is 14 MB)
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_rows_and_the_memory_of_j(tmp_path):
    out = tmp_path / "speed.csv"
    done = subprocess.run([sys.executable, "-m", "polytask", "bench", "speed", "--encoders", "mlp", "--tasks", "2",
                           "--methods", "upgrad,graddrop", "--no-features", "--no-small", "--steps", "1", "--warmup", "1",
                           "--clock", "cpu", "--csv", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["method"], r["mode"]): r for r in csv.DictReader(out.open())}
    assert set(rows) == {("(equal: 1 backward)", "-"), ("(floor: T backwards)", "-"), ("(task Jacobian alone)", "-"),
                         ("upgrad", "shared"), ("upgrad", "autogram"), ("graddrop", "shared")}
    assert float(rows[("(floor: T backwards)", "-")]["vs_floor"]) == pytest.approx(1.0)
    j_mb = 2 * 1_837_312 * 4 / 2**20  # T × |θ| float32 values of the MLP 512 → 1024 → 1024 → 256
    for key in [("(task Jacobian alone)", "-"), ("upgrad", "shared"), ("graddrop", "shared")]:
        # J's storage is kept between steps: the measurement makes it anew, so it is in the peak
        assert float(rows[key]["extra_mb"]) > 0.8 * j_mb, (key, rows[key]["extra_mb"])
    assert float(rows[("upgrad", "autogram")]["extra_mb"]) < 0.5 * j_mb


def test_the_jacobian_reference_writes_j_with_torchs_public_call(monkeypatch):
    """The "task Jacobian alone" row writes the same J as the engine's ``task_jacobian``, by
    ``torch.autograd.grad`` (one call per task, as a user's own loop makes them), into kept storage."""
    import torch

    from polytask.bench.small import tiny_problem
    from polytask.bench.speed import jacobian_step
    from polytask.engine.jacobian import task_jacobian

    problem = tiny_problem()
    step = jacobian_step(problem)
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1) or real(*a, **k))
    step(0)
    assert len(calls) == len(problem.tasks)
    kept = step.release.__self__[0]  # the list whose `clear` frees J: its one entry is J's storage
    storage = kept.data_ptr()
    step(1)
    assert kept.data_ptr() == storage  # the second step writes into the first one's J
    shared = list(problem.model.shared_parameters())
    _, losses = problem.losses()
    assert torch.equal(kept, task_jacobian(list(losses.values()), shared))
