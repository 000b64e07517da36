"""Two CPU processes (gloo) train exactly like one process on the same global batches."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import ddp_script  # noqa: E402

pytestmark = pytest.mark.slow  # subprocesses / hundreds of generated examples

HERE = Path(__file__).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([exe, "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}", *args],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def launch(script: str, tmp_path_factory) -> dict:
    """Run tests/SCRIPT OUT on two torchrun ranks and load what rank 0 saved in OUT."""
    out = tmp_path_factory.mktemp(Path(script).stem) / "results.pt"
    done = torchrun(str(HERE / script), str(out), cwd=HERE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_same_state(ranks: dict, single: dict, name: str) -> None:
    """The state two ranks reached equals one process's, tensor by tensor, to float round-off."""
    for key, value in single.items():
        torch.testing.assert_close(ranks[key], value, rtol=2e-5, atol=2e-6, msg=f"{name}: {key}")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    return launch("ddp_script.py", tmp_path_factory)


@pytest.mark.parametrize("method", ddp_script.METHODS)
def test_two_ranks_match_one_process(ddp_results, method):
    torch.set_num_threads(1)
    single, _ = ddp_script.train(method)
    assert_same_state(ddp_results[method], single, method)
    assert int(ddp_results[f"{method}:bytes"]) > 0


@pytest.mark.parametrize("method", [m for m in ddp_script.METHODS if m.endswith(":hooks")])
def test_a_post_accumulate_hook_runs_once_a_step_on_the_averaged_gradient(ddp_results, method):
    """A hook on every parameter (torch's optimiser-in-backward recipe) runs once per step on each
    parameter with a gradient, seeing the gradient averaged over ranks that the optimiser steps with,
    on two ranks as in one process (under pcgrad it ran on no shared parameter and on every head)."""
    torch.set_num_threads(1)
    _, trainer = ddp_script.train(method)
    for log in (ddp_results[f"{method}:hooks"], torch.tensor(trainer.hook_log)):
        assert len(log) == 4
        for right, total, worst in log.tolist():
            assert right == total and worst == 0.0


def test_averaged_gradients_are_written_into_the_held_tensors(ddp_results):
    """The cross-rank mean goes into the ``.grad`` a rank holds (it was a new tensor: a caller's
    reference to it was left with the rank's own gradient), in each parameter's dtype (a float64
    bias next to float32 weights took the flat buffer's float32), and a gradient only another rank
    had is laid out as its parameter (channels-last)."""
    got = ddp_results["in_place"]
    assert bool(got["kept"]) and bool(got["bias_dtype_ok"]) and bool(got["conv_strides_ok"])
    torch.testing.assert_close(got["weight"], torch.full((3, 2), 1.5))
    torch.testing.assert_close(got["bias"], torch.full((3,), 0.75, dtype=torch.float64))
    torch.testing.assert_close(got["conv"], torch.full((4, 3, 3, 3), 0.5).to(memory_format=torch.channels_last))


@pytest.mark.parametrize("route", ["Uncertainty", "Differentiable"])
def test_a_methods_own_parameters_are_averaged_over_ranks_even_if_left_out(ddp_results, route):
    """The engine averages the method's own parameters' gradients with ``reduce_params`` whether or not
    the caller listed them: both ranks' log-variances stay equal on both of the method's routes."""
    ranks = ddp_results[f"log_vars:{route}"]
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)
    assert not torch.equal(ranks[0], torch.zeros(2))


def test_a_task_labelled_on_one_rank_only_is_evaluated_on_every_rank(ddp_results):
    """Every rank gets the one process's metrics of a task whose labels all sit on rank 0 (it hung)."""
    single = ddp_script.labels_on_one_rank()
    for values in ddp_results["evaluate:labels_on_one_rank"]:
        assert values.keys() == single.keys()
        for task in single:
            assert values[task] == pytest.approx(single[task], rel=1e-5), task


def test_a_run_resumed_mid_epoch_keeps_every_ranks_share_of_the_epoch(ddp_results, tmp_path):
    """DWA reads the epochs' mean training losses: after a resume from a mid-epoch checkpoint they are
    the one process's, so are the parameters."""
    torch.set_num_threads(1)
    single = ddp_script.dwa_resumed_mid_epoch(tmp_path / "single")
    assert_same_state(ddp_results["dwa:resumed"], single, "dwa resumed")


def test_gramian_methods_send_the_jacobian(ddp_results):
    params = sum(v.numel() for k, v in ddp_results["equal"].items() if k.startswith("encoder"))
    # loss methods send the gradient once (+ T losses); Gramian methods also send J (T×P on θ)
    assert int(ddp_results["pcgrad:bytes"]) > 2 * int(ddp_results["equal:bytes"])
    assert int(ddp_results["equal:bytes"]) >= 4 * 4 * params  # 4 steps × the fp32 gradient of θ at least


def test_torchrun_cli_only_rank_zero_writes(tmp_path):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(300, 4)), columns=list("wxyz"))
    frame["t1"] = (frame["w"] > 0).astype(int)
    frame["t2"] = frame["x"] * 3
    frame.to_csv(tmp_path / "d.csv", index=False)
    (tmp_path / "cfg.yaml").write_text(
        f"output_dir: {tmp_path / 'run'}\ndata: {{files: {{train: {tmp_path / 'd.csv'}}}}}\n"
        "tasks: {t1: {kind: binary}, t2: {kind: regression}}\nmethod: {name: mgda}\n"
        "train: {epochs: 2, batch_size: 32}\nrun: {progress: false}\n")
    done = torchrun("-m", "polytask", "train", str(tmp_path / "cfg.yaml"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory") == 1  # both ranks finish; rank 0 alone prints the one results table
    files = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert {"summary.json", "metrics.csv", "checkpoints"} <= set(files)
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_a_cpu_run_in_an_nccl_group_is_refused_with_the_fix(monkeypatch):
    """An NCCL group started by the user's script and `run.device: cpu`: one clear error (before, the
    first broadcast of the model failed inside torch with "No backend type associated with device
    type cpu", found on a GPU)."""
    import torch.distributed as dist

    from polytask.core.errors import InvalidParameterError
    from polytask.engine.comm import Communicator

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    with pytest.raises(InvalidParameterError, match="`run.device` is 'cpu' but the process group already started uses "
                                                     "NCCL.*set run.device to cuda or auto"):
        Communicator.from_env(torch.device("cpu"))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 0)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 1)
    assert Communicator.from_env(torch.device("cpu")).world_size == 1  # gloo takes host tensors
