"""polytask methods inside a real lightning.Trainer: the same update as polytask's own engine,
2-process DDP on CPU equal to one process, bf16 autocast, task weights in Lightning's logger,
the engine's state in Lightning's checkpoints."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

pl = pytest.importorskip("lightning.pytorch", reason="pip install 'polytask[lightning]'")

import polytask as pt  # noqa: E402
from polytask.core.errors import InvalidParameterError  # noqa: E402
from polytask.integrations.lightning import MultiTaskModule  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from lightning_script import Rows  # noqa: E402

SCRIPT = Path(__file__).parent / "lightning_script.py"
TASKS = [pt.Task("a", "regression"), pt.Task("b", "binary")]
OPTIM = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "clip": {"norm": 5.0}}


def model() -> pt.models.HardSharing:
    torch.manual_seed(0)
    return pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 16]), TASKS)


def lightning_trainer(folder: Path, epochs: int = 2, **kwargs) -> pl.Trainer:
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=pl.loggers.CSVLogger(str(folder), name="l",
                      version=0), default_root_dir=str(folder), enable_progress_bar=False, enable_model_summary=False,
                      log_every_n_steps=1, **kwargs)


def loader() -> DataLoader:
    rows = Rows()
    return DataLoader(rows, batch_size=32, sampler=DistributedSampler(rows, num_replicas=1, rank=0, seed=0))


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize("method", ["equal", "upgrad", "uncertainty"])
def test_the_same_update_as_polytasks_own_engine(tmp_path, method, one_thread):
    module = MultiTaskModule(model(), method=method, optim=OPTIM)
    lightning_trainer(tmp_path).fit(module, loader())
    assert module.engine.kept_bytes == 0  # J's storage, kept between steps, is freed when training ends
    # the same two epochs by hand: polytask's Engine, SGD, clipping
    net = model()
    engine = pt.Engine(method, net.shared_parameters(), last_shared_params=net.last_shared_parameters())
    opt = torch.optim.SGD([*net.parameters(), *engine.parameters()], lr=0.05)
    data = loader()
    for epoch in range(2):
        data.sampler.set_epoch(epoch)
        for x, y, m in data:
            out = net(x)
            losses = {t: net.tasks[t].loss(out[t], y[t].float(), m.get(t)) for t in ("a", "b")}
            opt.zero_grad(set_to_none=True)
            engine.backward(losses, epoch=epoch)
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], 5.0)
            opt.step()
    for (name, got), want in zip(module.model.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)


def test_task_weights_and_metrics_reach_lightnings_logger(tmp_path, one_thread):
    module = MultiTaskModule(model(), method={"name": "dwa", "temperature": 2.0}, optim=OPTIM)
    lightning_trainer(tmp_path, epochs=3).fit(module, loader(), DataLoader(Rows(64), batch_size=64))
    logged = pd.read_csv(tmp_path / "l" / "version_0" / "metrics.csv")
    for column in ("train/loss/a_step", "train/weight/b_step", "val/a/rmse", "val/b/auroc", "val/loss/b"):
        assert logged[column].notna().any(), column
    weights = logged["train/weight/a_step"].dropna()
    assert len(weights) == 12 and weights.iloc[-1] != weights.iloc[0]  # DWA moves the weights after epoch 2


@pytest.mark.parametrize("method", ["uncertainty", "upgrad"])
def test_clipping_is_the_trainers_by_value_then_by_norm_on_the_models_parameters(tmp_path, method, one_thread):
    optim = {**OPTIM, "clip": {"value": 0.02, "norm": 0.05}}  # both bind on every step here
    module = MultiTaskModule(model(), method=method, optim=optim)
    lightning_trainer(tmp_path, epochs=1).fit(module, loader())
    net = model()
    engine = pt.Engine(method, net.shared_parameters(), last_shared_params=net.last_shared_parameters())
    opt = torch.optim.SGD([*net.parameters(), *engine.parameters()], lr=0.05)
    for x, y, m in loader():
        out = net(x)
        opt.zero_grad(set_to_none=True)
        engine.backward({t: net.tasks[t].loss(out[t], y[t].float(), m.get(t)) for t in ("a", "b")}, epoch=0)
        torch.nn.utils.clip_grad_value_(net.parameters(), 0.02)  # the Trainer's order, the model's parameters
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.05)
        opt.step()
    for (name, got), want in zip(module.model.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    for got, want in zip(module.method.parameters(), engine.parameters()):  # log-variances: not clipped
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_learning_rate_schedule_steps_once_an_epoch(tmp_path, one_thread):
    optim = {**OPTIM, "scheduler": "exponential"}  # γ = 0.5 an epoch
    module = MultiTaskModule(model(), method="equal", optim=optim)
    lightning_trainer(tmp_path, epochs=3).fit(module, loader())
    assert [g["lr"] for g in module.optimizers().param_groups] == pytest.approx([0.05 * 0.5**3])
    # the same three epochs by hand, the schedule stepped at each epoch's end
    net = model()
    engine = pt.Engine("equal", net.shared_parameters(), last_shared_params=net.last_shared_parameters())
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    schedule = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    data = loader()
    for epoch in range(3):
        data.sampler.set_epoch(epoch)
        for x, y, m in data:
            out = net(x)
            opt.zero_grad(set_to_none=True)
            engine.backward({t: net.tasks[t].loss(out[t], y[t].float(), m.get(t)) for t in ("a", "b")}, epoch=epoch)
            torch.nn.utils.clip_grad_norm_([p for p in net.parameters() if p.grad is not None], 5.0)
            opt.step()
        schedule.step()
    for (name, got), want in zip(module.model.state_dict().items(), net.state_dict().values()):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
    # and resumed from the checkpoint of epoch 2, the schedule carries on where it was
    first = MultiTaskModule(model(), method="equal", optim=optim)
    lightning_trainer(tmp_path / "r", epochs=2).fit(first, loader())
    resumed = MultiTaskModule(model(), method="equal", optim=optim)
    lightning_trainer(tmp_path / "r", epochs=3).fit(resumed, loader(),
                                                    ckpt_path=str(next((tmp_path / "r").rglob("*.ckpt"))))
    assert [g["lr"] for g in resumed.optimizers().param_groups] == pytest.approx([0.05 * 0.5**3])
    for got, want in zip(resumed.model.state_dict().values(), module.model.state_dict().values()):
        torch.testing.assert_close(got, want)


class FirstBatchOnly(Rows):
    """Task b labelled in the first batch of 32 only (the loader below does not shuffle)."""

    def __init__(self) -> None:
        super().__init__()
        self.known = torch.arange(len(self.x)) < 32


def test_a_tasks_weight_is_logged_on_the_steps_it_has_a_loss(tmp_path, one_thread):
    """A step without b's labels logged b's weight as 0, so its epoch mean was 0.25 (the Trainer's is
    the mean over the steps with a loss: 1 here)."""
    module = MultiTaskModule(model(), method="equal", optim=OPTIM)
    lightning_trainer(tmp_path, epochs=1).fit(module, DataLoader(FirstBatchOnly(), batch_size=32))
    logged = pd.read_csv(tmp_path / "l" / "version_0" / "metrics.csv")
    # (Lightning's CSV rows repeat a step value not logged again; the epoch's mean is over the logged ones)
    assert logged["train/weight/b_epoch"].dropna().tolist() == [1.0]
    assert logged["train/weight/a_epoch"].dropna().tolist() == [1.0]
    assert logged["train/loss/b_epoch"].dropna().tolist() == pytest.approx(logged["train/loss/b_step"].iloc[:1].tolist())


def test_cosine_without_max_epochs_is_refused(tmp_path, one_thread):
    """Its period is the run's epochs; with max_steps alone it annealed to 0 and back every epoch."""
    module = MultiTaskModule(model(), method="equal", optim={**OPTIM, "scheduler": "cosine"})
    trainer = pl.Trainer(max_steps=20, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    with pytest.raises(InvalidParameterError, match="'cosine' anneals over the run's epochs.*max_epochs"):
        trainer.fit(module, loader())


def test_steps_the_scaler_skips_leave_the_methods_state_as_it_was(tmp_path, one_thread):
    """fp16 with a loss scale so large that every step overflows: the scaler skips each, and FAMO's
    logits and Adam moments stay where they were (they learned from two losses of one model)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = MultiTaskModule(model(), method="famo", optim=OPTIM)
    module.method.setup(module.names)
    before = {k: v.clone() for k, v in module.method.state_dict().items() if isinstance(v, torch.Tensor)}
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 127, growth_interval=10 ** 6)
    lightning_trainer(tmp_path, epochs=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(module, loader())
    assert scaler.get_scale() < 2.0 ** 127  # it overflowed and halved
    after = module.method.state_dict()
    for key, value in before.items():
        torch.testing.assert_close(after[key], value, rtol=0, atol=0, equal_nan=True, msg=key)


def test_a_checkpoint_in_the_middle_of_an_epoch_keeps_the_epochs_losses_so_far(tmp_path, one_thread):
    """The method's end-of-epoch hook (DWA) reads the epoch's mean training losses: a run resumed from a
    checkpoint saved mid-epoch had only the batches after it."""
    module = MultiTaskModule(model(), method="dwa", optim=OPTIM)
    trainer = lightning_trainer(tmp_path, epochs=1, limit_train_batches=2)
    trainer.fit(module, loader())
    module._epoch_loss, module._epoch_count = {"a": 6.0, "b": 1.5}, {"a": 64, "b": 48}  # two batches in
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    resumed = MultiTaskModule(model(), method="dwa", optim=OPTIM)
    resumed.on_load_checkpoint(torch.load(_saved(checkpoint, tmp_path), weights_only=False))
    assert resumed._epoch_loss == {"a": 6.0, "b": 1.5} and resumed._epoch_count == {"a": 64, "b": 48}


def _saved(checkpoint: dict, folder: Path) -> Path:
    path = folder / "mid.ckpt"
    torch.save(checkpoint, path)
    return path


def test_engine_state_is_in_lightnings_checkpoint_and_resumes(tmp_path, one_thread):
    straight = MultiTaskModule(model(), method="famo", optim=OPTIM)
    lightning_trainer(tmp_path / "s", epochs=4).fit(straight, loader())
    first = MultiTaskModule(model(), method="famo", optim=OPTIM)
    lightning_trainer(tmp_path / "r", epochs=2).fit(first, loader())
    checkpoint = next((tmp_path / "r").rglob("*.ckpt"))
    assert "polytask_engine" in torch.load(checkpoint, weights_only=False)
    resumed = MultiTaskModule(model(), method="famo", optim=OPTIM)
    lightning_trainer(tmp_path / "r", epochs=4).fit(resumed, loader(), ckpt_path=str(checkpoint))
    assert resumed.engine.index == straight.engine.index == 16
    for got, want in zip(resumed.model.state_dict().values(), straight.model.state_dict().values()):
        torch.testing.assert_close(got, want)


def test_bf16_autocast_trains(tmp_path, one_thread):
    module = MultiTaskModule(model(), method="mgda", optim=OPTIM)
    lightning_trainer(tmp_path, precision="bf16-mixed").fit(module, loader())
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert module.engine.index == 8


def test_bad_arguments_are_clear_errors():
    with pytest.raises(InvalidParameterError, match="MultiTaskModel"):
        MultiTaskModule(torch.nn.Linear(2, 2))
    with pytest.raises(InvalidParameterError, match="pcgard"):
        MultiTaskModule(model(), method="pcgard")


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    """lightning_script.py with upgrad on one process and on two (Lightning's DDP strategy)."""
    folder = tmp_path_factory.mktemp("lightning_ddp")
    for devices in (1, 2):
        done = subprocess.run([sys.executable, str(SCRIPT), str(folder / str(devices)), str(devices), "upgrad"],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return folder


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(ddp_runs):
    one, two = (torch.load(ddp_runs / d / "params.pt") for d in ("1", "2"))
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_under_ddp_the_logged_step_losses_are_the_global_batchs(ddp_runs):
    """Each step's train/loss/TASK is the loss on the global batch, as one process logs it (rank 0's
    own half-batch loss reached the logger)."""
    one, two = (pd.read_csv(ddp_runs / d / "logs" / "version_0" / "metrics.csv") for d in ("1", "2"))
    for column in ("train/loss/a_step", "train/loss/b_step"):
        a, b = one[column].dropna().to_numpy(), two[column].dropna().to_numpy()
        assert len(a) == len(b) == 8, column
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=column)


@pytest.mark.slow
def test_under_ddp_the_epochs_losses_are_every_ranks_in_the_hook_and_the_checkpoint(ddp_runs):
    """A mid-epoch checkpoint holds both ranks' sums (Lightning writes rank 0's, which held its own
    share alone), added task by task where the ranks met their tasks in different orders (summed by
    position, a's went with b's); rank 0 alone takes them back, and the end-of-epoch hook (DWA's
    history) then gets the mean over both ranks' rows."""
    ranks = torch.load(ddp_runs / "2" / "epoch.pt", weights_only=False)
    for rank, got in enumerate(ranks):
        assert got["hook"] == pytest.approx({"a": 8.0 / 128, "b": 2.0 / 64}), rank
        assert got["saved"]["loss"] == pytest.approx({"a": 8.0, "b": 2.0}) and got["saved"]["count"] == {"a": 128, "b": 64}
    assert ranks[0]["resumed"] == ({"a": 8.0, "b": 2.0}, {"a": 128, "b": 64})
    assert ranks[1]["resumed"] == ({}, {})


def test_a_gradient_scaler_in_lightnings_precision_plugin_trains_like_32_bits(tmp_path, one_thread):
    """Lightning's 16-mixed plugin with its GradScaler, on the CPU (tests/test_cuda.py runs 16-mixed on a GPU):
    the engine scales the losses by the scaler's scale and Lightning's optimizer step unscales. The
    scaler's scale tensor was never made, so its unscale_ failed on every step (found on a GPU)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    full = MultiTaskModule(model(), method="upgrad", optim=OPTIM)
    lightning_trainer(tmp_path / "32").fit(full, loader())
    half = MultiTaskModule(model(), method="upgrad", optim=OPTIM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    lightning_trainer(tmp_path / "16", plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)]).fit(half, loader())
    assert half.engine.index == 8 and scaler.get_scale() == 2.0 ** 10  # every step taken, none overflowed
    for (name, got), want in zip(half.model.state_dict().items(), full.model.state_dict().values(), strict=True):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2, msg=name)
