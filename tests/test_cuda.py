"""What only a CUDA device can check; without one the whole module is skipped.

Run it on a GPU machine with ``pytest tests/test_cuda.py``. It checks:

* the no-J Gramian equals J Jᵀ on CUDA on every architecture and encoder, with both strategies
  (the per-task loop and vmapped passes);
* the batched task Jacobian equals the loop, and ``jacobian: auto`` times both on CUDA and keeps one;
* every registered method's update on CUDA equals its update on the CPU (the random methods draw
  from CPU generators, so they draw the same numbers), except GradDrop's, which draws on the
  device: it is checked for the same draws run after run and for its sign-purity rate;
* cuDNN's GRU and LSTM: the no-J Gramian refuses them and the engine warns and takes J;
* ``gramian: auto`` reads ``SMALL_JACOBIAN_CUDA`` on a GPU;
* bf16 autocast on CUDA: the no-J Gramian equals J Jᵀ taken under the same autocast;
* fp16 with the Trainer's GradScaler: overflowing steps are skipped and the scale comes down,
  the other steps train;
* Lightning's ``16-mixed`` on the GPU gives the same parameters as ``32-true`` to fp16 round-off;
* a one-rank NCCL process group makes the Trainer take its collective path, with the same result
  as training without a process group.
"""

from __future__ import annotations

import math
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polytask as pt
from polytask.engine import Engine
from polytask.engine.autogram import AutogramGramian, AutogramUnavailable
from polytask.engine.jacobian import JacobianComputer, gramian, task_jacobian
from polytask.methods import METHODS
from polytask.models import ARCHITECTURES

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HERE = Path(__file__).parent
CUDA = torch.device("cuda")

from ddp_script import METHODS as DDP_METHODS  # noqa: E402
from ddp_script import train as ddp_train  # noqa: E402
from methods.helpers import build as build_method  # noqa: E402
from methods.helpers import hard_sharing  # noqa: E402
from test_architectures import build  # noqa: E402
from test_autogram import ENCODER_CASES  # noqa: E402


def targets_for(tasks, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return {t.name: (torch.randint(0, t.num_classes, (n,), generator=g) if t.kind == "multiclass"
                     else torch.randint(0, 2, (n,), generator=g).float()).to(device) for t in tasks}


def assert_gramian_is_j_jt(losses, params, **options) -> None:
    want = gramian(task_jacobian(losses, params))
    got = AutogramGramian(**options)(losses, params)
    assert got.device.type == CUDA.type
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11 * float(want.abs().max()))


@pytest.mark.parametrize("strategy", ["loop", "batched"])
@pytest.mark.parametrize("name", ARCHITECTURES.names())
def test_no_j_gramian_on_cuda_equals_j_jt_on_every_architecture(name, strategy):
    model, x, tasks = build(name, 3)
    model = model.double().to(CUDA)
    x = x.double().to(CUDA)
    out = model.decode(model.encode(x))
    targets = targets_for(tasks, len(x), CUDA)
    losses = [t.loss(out[t.name], targets[t.name]) for t in tasks]
    assert_gramian_is_j_jt(losses, [p for p in model.shared_parameters() if p.requires_grad],
                           strategy=strategy, passes="held")


#: encoders whose recurrent layers run as one cuDNN kernel on CUDA (CudnnRnnBackward0): the no-J
#: Gramian sees no per-layer products there and the engine takes the J route instead
CUDNN_RNN = {"text-gru", "text-lstm"}


def encoder_losses(encoder, x):
    tasks = [pt.Task(f"t{i}", kind="regression") for i in range(3)]
    torch.manual_seed(1)
    model = pt.models.HardSharing(encoder, tasks).double().to(CUDA)
    out = model.decode(model.encode((x.double() if x.is_floating_point() else x).to(CUDA)))
    losses = [(out[t.name] - i).pow(2).mean() for i, t in enumerate(tasks)]
    return model, losses, [p for p in model.shared_parameters() if p.requires_grad]


@pytest.mark.parametrize("passes", ["streamed", "held"])
@pytest.mark.parametrize("case", ENCODER_CASES, ids=[c[0] for c in ENCODER_CASES])
def test_no_j_gramian_on_cuda_equals_j_jt_on_every_encoder(case, passes):
    name, encoder, x = case
    _, losses, params = encoder_losses(encoder, x)
    if name in CUDNN_RNN:
        with pytest.raises(AutogramUnavailable, match="CudnnRnnBackward0"):
            AutogramGramian(strategy="loop", passes=passes)(losses, params)
        return
    assert_gramian_is_j_jt(losses, params, strategy="loop", passes=passes)


@pytest.mark.parametrize("name", sorted(CUDNN_RNN))
def test_cudnn_rnns_fall_back_to_the_jacobian_with_one_warning_and_the_same_update(name):
    encoder, x = next((e, x) for n, e, x in ENCODER_CASES if n == name)
    model, losses, params = encoder_losses(encoder, x)
    engine = Engine("upgrad", params, gramian="autogram", heads="weighted")
    with pytest.warns(UserWarning, match="no-J Gramian.*CudnnRnnBackward0.*task Jacobian instead"):
        report = engine.backward(dict(zip(("t0", "t1", "t2"), losses, strict=True)), diagnose=True)
    assert engine.gramian_route == "jacobian"
    jacobian = task_jacobian(encoder_losses(encoder, x)[1], params)
    torch.testing.assert_close(report.gramian, gramian(jacobian), rtol=1e-9, atol=1e-12)


def regression_losses(model, tasks, seed: int, device: torch.device, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 4, generator=g, dtype=dtype), torch.randn(16, len(tasks), generator=g, dtype=dtype)
    x, y = x.to(device), y.to(device)
    z = model.encode(x)
    out = model.decode(z)
    return z, {t.name: t.loss(out[t.name], (i + 1) * y[:, i]) for i, t in enumerate(tasks)}


def test_batched_jacobian_equals_the_loop_and_auto_keeps_one_on_cuda():
    model, tasks = hard_sharing(6)
    model = model.double().to(CUDA)
    params = list(model.shared_parameters())
    computer = JacobianComputer("auto")
    for seed in range(6):  # auto times each strategy `trials` times, then keeps the faster
        _, losses = regression_losses(model, tasks, seed, CUDA)
        losses = list(losses.values())
        got = computer(losses, params)
        torch.testing.assert_close(got, task_jacobian(losses, params), rtol=1e-10, atol=1e-12)
    assert computer.chosen in ("loop", "batched")
    assert all(len(v) == computer.trials for v in computer.timings.values())


def engine_run(name: str, device: torch.device, steps: int = 3):
    """Three steps of method ``name`` on a double-precision hard-shared MLP on ``device``:
    the last step's weights and every parameter's gradient, on the CPU."""
    model, tasks = hard_sharing(4, seed=0)
    model = model.double().to(device)
    method = build_method(name, [t.name for t in tasks]).double().to(device)
    engine = Engine(method, model.shared_parameters(), last_shared_params=model.last_shared_parameters())
    for seed in range(steps):
        model.zero_grad(set_to_none=True)
        z, losses = regression_losses(model, tasks, seed, device)
        report = engine.backward(losses, features=[z], epoch=seed)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).cpu() for p in model.parameters()]
    return report.weights, grads


#: draws its P uniforms on the device on CUDA (graddrop's Departures): not the CPU's numbers
DEVICE_DRAWS = {"graddrop"}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_gives_the_same_update_on_cuda_as_on_the_cpu(name):
    if name in DEVICE_DRAWS:
        first, second = engine_run(name, CUDA), engine_run(name, CUDA)  # the same draws run after run
        assert first[0] == second[0] and all(torch.equal(a, b) for a, b in zip(first[1], second[1], strict=True))
        return
    cpu_weights, cpu_grads = engine_run(name, torch.device("cpu"))
    cuda_weights, cuda_grads = engine_run(name, CUDA)
    assert cuda_weights == pytest.approx(cpu_weights, rel=1e-6, abs=1e-9), name
    for a, b in zip(cuda_grads, cpu_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)


def test_graddrop_on_cuda_keeps_one_sign_per_coordinate_at_the_purity_rate():
    from methods.helpers import make_step

    method = build_method("graddrop", ["t0", "t1", "t2", "t3"], leak=0.0)
    j = torch.randn(4, 200_000, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(CUDA)
    d = method(make_step(method, j, seed=7)).direction
    assert d.device == j.device
    pos, neg = j.clamp(min=0).sum(0), j.clamp(max=0).sum(0)
    took_pos, took_neg = d == pos, d == neg
    assert bool((took_pos | took_neg | (d == 0)).all())
    purity = 0.5 * (1 + (pos + neg) / (pos - neg))  # P(keep the positive ones) per coordinate
    expected, spread = float(purity.sum()), float((purity * (1 - purity)).sum()) ** 0.5
    assert abs(float(took_pos.sum()) - expected) < 5 * spread
    again = method(make_step(method, j, seed=7)).direction
    assert torch.equal(again, d)  # the step's stream seeds the device draws


def test_bf16_autocast_no_j_gramian_equals_the_jacobians_on_cuda():
    model, tasks = hard_sharing(4)
    model = model.to(CUDA)
    params = list(model.shared_parameters())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, losses = regression_losses(model, tasks, 0, CUDA, torch.float32)
    losses = list(losses.values())
    want = gramian(task_jacobian(losses, params).float())
    got = AutogramGramian()(losses, params)
    # both read the same bf16 backward; they differ in the order of float32 sums only
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    engine = Engine("upgrad", params, gramian="autogram")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, losses = regression_losses(model, tasks, 1, CUDA, torch.float32)
    report = engine.backward(losses)
    assert engine.gramian_route == "autogram"
    assert all(math.isfinite(w) and w > 0 for w in report.weights.values())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def fp16_trainer(method: str, init_scale: float):
    tasks, data = ddp_problem()
    torch.manual_seed(1)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 8]), tasks)
    trainer = pt.Trainer(model, tasks, method=method, loop={"epochs": 3, "batch_size": 8}, optim={"lr": 0.05},
                         run={"progress": False, "device": "cuda", "precision": "16"})
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=init_scale)
    return trainer, data


def ddp_problem():
    from ddp_script import problem
    return problem()


@pytest.mark.parametrize("method", ["equal", "upgrad", "mgda"])
def test_fp16_with_the_gradient_scaler_skips_overflowing_steps_and_trains(method):
    # at 2^22 the output gradients (≈ 2^22 / batch) pass fp16's 65504: the scaler skips those steps,
    # halving its scale each time until the gradients fit; the steps after that train (36 in all)
    trainer, data = fp16_trainer(method, 2.0 ** 22)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit(data)
    scale = trainer.scaler.get_scale()
    assert scale < 2.0 ** 22  # overflowing steps were seen and skipped
    after = trainer.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k].to(before[k].device)) for k in before), "no step was applied"
    # the same run from a scale that never overflows trains every step
    trainer, data = fp16_trainer(method, 2.0 ** 8)
    trainer.fit(data)
    assert trainer.scaler.get_scale() >= 2.0 ** 8


def test_fp16_steps_the_scaler_skips_leave_the_methods_state_as_it_was():
    """Every step overflows (2^127 halved on each of 36 steps is still past fp16): FAMO's state stays its first."""
    trainer, data = fp16_trainer("famo", 2.0 ** 127)
    trainer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0 ** 127, growth_interval=10 ** 6)
    trainer.fit(data)
    assert trainer.scaler.get_scale() < 2.0 ** 127
    assert torch.equal(trainer.engine.method.logits.cpu(), torch.zeros(3, dtype=torch.float64))
    assert torch.equal(trainer.engine.method.adam_steps.cpu(), torch.zeros(3, dtype=torch.float64))


def run_lightning(out: Path, precision: str) -> dict[str, torch.Tensor]:
    done = subprocess.run([sys.executable, str(HERE / "lightning_script.py"), str(out), "1", "upgrad", precision, "gpu"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-8000:]
    return torch.load(out / "params.pt", map_location="cpu")


def test_lightning_16_mixed_on_the_gpu_matches_32_true():
    pytest.importorskip("lightning.pytorch", reason="pip install 'polytask[lightning]'")
    root = Path(__import__("tempfile").mkdtemp())
    full = run_lightning(root / "32", "32-true")
    half = run_lightning(root / "16", "16-mixed")
    for name in full:
        assert torch.isfinite(half[name]).all(), name
        torch.testing.assert_close(half[name], full[name], rtol=2e-2, atol=2e-2, msg=name)
    shutil.rmtree(root)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_rank_nccl_takes_the_collective_path_with_the_same_result(tmp_path):
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    out = tmp_path / "nccl.pt"
    done = subprocess.run([exe, "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                           str(HERE / "cuda_nccl_script.py"), str(out)], capture_output=True, text=True, timeout=600,
                          cwd=HERE)
    assert done.returncode == 0, done.stderr[-8000:]
    nccl = torch.load(out)
    for name in DDP_METHODS:
        state, trainer = ddp_train(name, device="cuda")
        assert trainer.comm is None and trainer.device.type == "cuda"
        assert int(nccl[f"{name}:bytes"]) > 0, name
        for key, value in state.items():
            torch.testing.assert_close(nccl[name][key], value.cpu(), rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_auto_takes_the_cuda_threshold_on_a_gpu(monkeypatch):
    import importlib

    engine_backward = importlib.import_module("polytask.engine.backward")  # the module, not its function
    tasks = [pt.Task(f"t{i}", kind="regression") for i in range(4)]
    for cuda_limit, cpu_limit, route in ((2 ** 27, 0, "jacobian"), (0, 2 ** 40, "autogram")):
        monkeypatch.setattr(engine_backward, "SMALL_JACOBIAN_CUDA", cuda_limit)
        monkeypatch.setattr(engine_backward, "SMALL_JACOBIAN", cpu_limit)  # the CPU's threshold must not decide
        torch.manual_seed(0)  # a batch smaller than the widths: the layers' Gram route is the cheaper one
        model = pt.models.HardSharing(pt.encoders.MLP(in_features=16, hidden=[32, 16]), tasks).to(CUDA)
        x, y = torch.randn(4, 16, device=CUDA), torch.randn(4, 4, device=CUDA)
        out = model(x)
        engine = Engine("mgda", model.shared_parameters())
        engine.backward({t.name: (out[t.name] - y[:, i]).pow(2).mean() for i, t in enumerate(tasks)})
        assert engine.gramian_route == route
