"""Training stability and reliability: gradient health, policies, clipping, exact resume."""

import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import polytask as pt
from polytask.cli.main import main
from polytask.train import CheckpointError, GradientHealthError, GradientHealthWarning, load_checkpoint


def regression_data(n=256, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    targets = {"a": scale * x[:, 0] + 0.1 * torch.randn(n, generator=g), "b": (x[:, 1] > 0).float()}
    return pt.data.MultiOutputDataset(x, targets)


TASKS = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]


def model(encoder=None):
    return pt.models.HardSharing(encoder or pt.encoders.MLP(in_features=6, hidden=[16, 8]), TASKS)


def test_exploding_run_is_stopped_naming_task():
    torch.manual_seed(0)
    trainer = pt.Trainer(model(), TASKS, loop={"epochs": 3, "batch_size": 32}, optim={"optimizer": "sgd", "lr": 1e4},
                         run={"progress": False})
    with pytest.raises(GradientHealthError, match=r"task|layer"):
        trainer.fit(regression_data(scale=100.0))


def test_exploding_step_of_a_jacobian_method_names_its_task_without_a_gramian():
    """A Jacobian method's report has no Gramian on most steps (it is not formed unless read); the
    rows' norms of J in the report still name the task whose gradient exploded."""
    torch.manual_seed(0)
    trainer = pt.Trainer(model(), TASKS, method="graddrop", health={"policy": "skip", "explode_threshold": 1e3},
                         loop={"epochs": 1, "batch_size": 32}, optim={"optimizer": "sgd", "lr": 1e-3}, run={"progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GradientHealthWarning)
        trainer.fit(regression_data(scale=1e5))  # task a's gradient is the large one
    events = [e for e in trainer.health.events if e["kind"] == "exploding_gradient"]
    assert events and all(e["tasks"] == ["a"] for e in events)


def test_exploding_run_with_skip_policy_keeps_parameters_finite():
    torch.manual_seed(0)
    trainer = pt.Trainer(model(), TASKS, health={"policy": "skip", "explode_threshold": 1e3}, loop={"epochs": 2, "batch_size": 32},
                         optim={"optimizer": "sgd", "lr": 1e4}, run={"progress": False})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(regression_data(scale=100.0))
    events = trainer.health.events
    assert events and {e["kind"] for e in events} <= {"exploding_gradient", "non_finite_gradient", "non_finite_loss"}
    assert any(issubclass(w.category, GradientHealthWarning) for w in caught)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


class NaNGradOnce(torch.autograd.Function):
    """Identity whose backward returns NaN at one chosen call."""

    calls = 0
    at = 3

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        NaNGradOnce.calls += 1
        return grad * float("nan") if NaNGradOnce.calls == NaNGradOnce.at else grad


class PoisonedEncoder(nn.Module):
    out_features = 8

    def __init__(self):
        super().__init__()
        self.net = pt.encoders.MLP(in_features=6, hidden=[16, 8])

    def forward(self, x):
        return NaNGradOnce.apply(self.net(x))


def test_skip_leaves_optimizer_and_method_state_untouched():
    torch.manual_seed(0)
    NaNGradOnce.calls = 0
    trainer = pt.Trainer(model(PoisonedEncoder()), TASKS, method="famo", health={"policy": "skip"}, loop={"epochs": 1, "batch_size": 32},
                         run={"progress": False})
    data = regression_data()
    trainer.check(data)
    seen = {}
    original = trainer.health.check

    def spy(step, tasks, gramian, task_norms=None):
        skip = original(step, tasks, gramian, task_norms)
        if skip:
            seen["method_after"] = {k: v.clone() for k, v in trainer.method.state_dict().items()
                                    if isinstance(v, torch.Tensor)}
        return skip

    trainer.health.check = spy
    before = {}
    original_step = trainer._train_step

    def step(groups):
        if trainer.step_index == NaNGradOnce.at - 1:
            before["method"] = {k: v.clone() for k, v in trainer.method.state_dict().items() if isinstance(v, torch.Tensor)}
            before["params"] = [p.detach().clone() for p in trainer.model.parameters()]
            before["opt_steps"] = [s.get("step") for s in trainer.optimizer.state.values()]
            out = original_step(groups)
            before["params_after"] = [p.detach().clone() for p in trainer.model.parameters()]
            before["opt_after"] = [s.get("step") for s in trainer.optimizer.state.values()]
            before["method_after"] = {k: v.clone() for k, v in trainer.method.state_dict().items()
                                      if isinstance(v, torch.Tensor)}
            return out
        return original_step(groups)

    trainer._train_step = step
    trainer.fit(data)
    assert [e["kind"] for e in trainer.health.events] == ["non_finite_gradient"]
    for a, b in zip(before["params"], before["params_after"]):
        assert torch.equal(a, b)
    assert before["opt_steps"] == before["opt_after"]
    for key, value in before["method"].items():
        assert torch.equal(value, before["method_after"][key]), key


def test_vanishing_gradients_flagged_in_deep_sigmoid_network():
    class DeepSigmoid(nn.Module):
        out_features = 8

        def __init__(self):
            super().__init__()
            layers = [nn.Linear(6, 8), nn.Sigmoid()]
            for _ in range(24):
                layers += [nn.Linear(8, 8), nn.Sigmoid()]
            self.net = nn.Sequential(*layers)

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(0)
    trainer = pt.Trainer(model(DeepSigmoid()), TASKS, health={"every": 1, "policy": "warn", "vanish_threshold": 1e-6, "vanish_patience": 3},
                         loop={"epochs": 1, "batch_size": 32}, run={"progress": False})
    with pytest.warns(GradientHealthWarning, match=r"layer 'encoder\.net\.0\.weight'.*below"):
        trainer.fit(regression_data())
    flagged = [e for e in trainer.health.events if e["kind"] == "vanishing_gradient"]
    assert flagged[0]["layers"] == ["encoder.net.0.weight"]
    kinds = {r["kind"] for r in trainer.health.rows}
    assert kinds == {"total_norm", "layer_norm", "task_norm", "cosine"}


def test_per_task_clipping_in_training_bounds_each_task():
    torch.manual_seed(0)
    class LastReport(pt.train.Callback):
        def on_step_end(self, trainer, step):
            self.report = step.report

    last = LastReport()
    trainer = pt.Trainer(model(), TASKS, loop={"epochs": 1, "batch_size": 64}, optim={"clip": {"per_task": 0.05}},
                         run={"progress": False}, callbacks=[last])
    trainer.fit(regression_data(scale=50.0))
    factors = last.report.clip
    norms = last.report.gramian.diagonal().sqrt()
    assert factors is not None and float(factors.min()) < 1.0
    assert bool(((factors * norms) <= 0.05 * (1 + 1e-5)).all())


def test_health_logs_written_and_plotted(tmp_path):
    torch.manual_seed(0)
    trainer = pt.Trainer(model(), TASKS, output_dir=tmp_path / "run", health={"every": 2}, loop={"epochs": 2, "batch_size": 64},
                         run={"progress": False})
    trainer.fit(regression_data(), regression_data(seed=1))
    frame = pd.read_csv(tmp_path / "run" / "gradients.csv")
    assert set(frame["kind"]) == {"total_norm", "layer_norm", "task_norm", "cosine"}
    assert set(frame["step"]) == set(range(0, 8, 2))
    assert (tmp_path / "run" / "gradients.png").stat().st_size > 1000


def test_corrupt_checkpoint_falls_back_then_errors(tmp_path):
    torch.manual_seed(0)
    run = tmp_path / "run"
    pt.Trainer(model(), TASKS, output_dir=run, loop={"epochs": 2, "batch_size": 64}, run={"progress": False}).fit(regression_data())
    last, previous = run / "checkpoints" / "last.pt", run / "checkpoints" / "previous.pt"
    assert load_checkpoint(previous)["epoch"] == 1 and load_checkpoint(last)["epoch"] == 2
    last.write_bytes(last.read_bytes()[: len(last.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(last)
    resumed = pt.Trainer(model(), TASKS, output_dir=run, resume=True, loop={"epochs": 3, "batch_size": 64}, run={"progress": False})
    with pytest.warns(UserWarning, match="previous checkpoint"):
        resumed.fit(regression_data())
    assert load_checkpoint(last)["epoch"] == 3
    previous.write_bytes(b"not a checkpoint")
    last.write_bytes(b"\x00" * 10)
    again = pt.Trainer(model(), TASKS, output_dir=run, resume=True, loop={"epochs": 4, "batch_size": 64}, run={"progress": False})
    with pytest.raises(CheckpointError, match=r"last\.pt|previous\.pt"):
        again.fit(regression_data())


def test_checkpoint_loading_executes_no_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------- kill and resume
CONFIG = """
seed: 3
output_dir: {out}
data: {{files: {{train: {csv}}}}}
tasks:
  y_reg: {{kind: regression}}
  y_cls: {{kind: binary}}
model: {{encoder: {{name: mlp, hidden: [32, 16], dropout: 0.2}}}}
method: {{name: famo}}
train: {{epochs: 3, batch_size: 16, checkpoint_every: 1}}
run: {{progress: false}}
optim: {{lr: 0.01}}
"""


def _write_problem(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1200, 5))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(5)])
    frame["y_reg"] = x[:, 0] * 2 + rng.normal(size=1200) * 0.1
    frame["y_cls"] = (x[:, 1] + x[:, 2] > 0).astype(int)
    frame["cat"] = rng.choice(["u", "v", "w"], size=1200)
    path = folder / "data.csv"
    frame.to_csv(path, index=False)
    return path


def _config(folder: Path, name: str, csv: Path) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(CONFIG.format(out=folder / name, csv=csv))
    return path


def _train_process(config: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen([sys.executable, "-m", "polytask", "train", str(config), "--quiet", *extra], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.mark.slow
def test_sigkill_at_any_moment_then_resume_is_bit_identical(tmp_path):
    # The uninterrupted reference and the final resume run in this process (one intra-op thread, as
    # the killed processes have): only the runs that are killed need processes of their own, and each
    # process start costs seconds of imports.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _in_process_test(tmp_path)
    finally:
        torch.set_num_threads(threads)


def _in_process_test(tmp_path: Path) -> None:
    csv = _write_problem(tmp_path)
    assert main(["train", str(_config(tmp_path, "reference", csv)), "--quiet"]) == 0
    killed_config = _config(tmp_path, "killed", csv)
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    kill_points: list[tuple[int, int]] = []
    # Each run is killed at a moment set by its progress, not by the clock alone: on a loaded machine
    # a whole 3-epoch run (~190 steps) can end within a second of its first checkpoint, so fixed
    # delays landed every kill on an epoch boundary or after the last step. The plan kills 20 steps
    # into a run (mid-epoch unless the run resumed just before a boundary), then at an arbitrary
    # moment 0.05 s after the run's first new checkpoint (it may hit a checkpoint mid-write), and
    # retries with step targets until a mid-epoch kill is on record.
    plan = [("steps", 20), ("seconds", 0.05), ("steps", 20), ("steps", 20), ("steps", 20)]
    for kind, amount in plan:
        if len(kill_points) >= 2 and any(epoch_step > 0 for _, epoch_step in kill_points):
            break
        args = ("--resume",) if last.exists() else ("--overwrite",)
        process = _train_process(killed_config, *args)
        start = checkpoint_step(last)
        deadline = time.time() + 120
        if kind == "steps":
            target = (start or 0) + amount
            while time.time() < deadline and process.poll() is None and (checkpoint_step(last) or 0) < target:
                time.sleep(0.01)
        else:
            while time.time() < deadline and process.poll() is None and checkpoint_step(last) in (None, start):
                time.sleep(0.01)
            time.sleep(amount)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            state = load_checkpoint(last)
            kill_points.append((state["epoch"], state["epoch_step"]))
    assert main(["train", str(killed_config), "--quiet", "--resume"]) == 0
    assert len(kill_points) >= 2, kill_points
    assert any(epoch_step > 0 for _, epoch_step in kill_points), kill_points  # at least one mid-epoch
    a = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")
    b = load_checkpoint(last)
    assert a["step"] == b["step"]
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    for key, value in a["engine"]["method"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["engine"]["method"][key]), key
    ref_metrics = pd.read_csv(tmp_path / "reference" / "metrics.csv")
    got_metrics = pd.read_csv(tmp_path / "killed" / "metrics.csv")
    pd.testing.assert_frame_equal(ref_metrics, got_metrics)


def checkpoint_step(path: Path) -> int | None:
    """Step of the checkpoint on disk (None before the first one)."""
    try:
        return load_checkpoint(path)["step"]
    except CheckpointError:
        return None


def test_cli_health_and_clip_settings_validated(tmp_path, capsys):
    csv = _write_problem(tmp_path)
    config = _config(tmp_path, "cfg", csv)
    code = main(["train", str(config), "--set", "health.policy=ignore"])
    assert code == 2 and "health.policy" in capsys.readouterr().err
    code = main(["train", str(config), "--set", "optim.clip.per_task=-1"])
    assert code == 2 and "optim.clip.per_task" in capsys.readouterr().err
    code = main(["train", str(config), "--set", "train.health.policy=skip"])  # the wave-1 key names its new place
    assert code == 2 and "`health` has moved: use the top-level section `health:`" in capsys.readouterr().err


def test_explosion_statistics_are_kept_per_set_of_trained_tasks():
    """Steps that alternate between tasks with their own data sets have their own gradient
    scales; one task's norm 100× another's is no explosion (issue 20: a sound per-task-data run
    with the temperature sampler stopped at step 73)."""
    from polytask.data import TaskDatasets
    from polytask.data.dataset import MultiOutputDataset

    g = torch.Generator().manual_seed(0)
    x_big, x_small = torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g)
    big = MultiOutputDataset(x_big, {"big": 300.0 * x_big[:, 0]})  # gradients ~1e4× the other task's
    small = MultiOutputDataset(x_small, {"small": (x_small[:, 1] > 0).float()})
    tasks = [pt.Task("big", kind="regression"), pt.Task("small", kind="binary")]
    torch.manual_seed(0)
    net = pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[16]), tasks)
    trainer = pt.Trainer(net, tasks, method="equal", sampler={"name": "temperature", "temperature": 2.0},
                         loop={"epochs": 2, "batch_size": 16}, optim={"lr": 1e-4},
                         health={"explode_threshold": 1e9}, run={"progress": False})
    trainer.fit(TaskDatasets({"big": big, "small": small}))  # stopped with "exceeds 100× the recent median" before
    assert trainer.step_index == 100 and not trainer.health.events
    assert set(trainer.health.recent) == {"big", "small"}


def test_tasks_given_as_names_instead_of_task_objects_are_one_clear_error():
    with pytest.raises(pt.InvalidParameterError, match="sequence of polytask.Task objects"):
        pt.Trainer(model(), ["a", "b"])
