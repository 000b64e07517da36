"""End-to-end tests of the Python API: Trainer, Engine, run directory, resume, errors.

Small seeded synthetic problems and small slices of the bundled Adult data, both data regimes.
Every test runs single-threaded (fast and reproducible on small CPU machines).
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import polytask as pt
from polytask.core.errors import DataError
from polytask.data import SAMPLERS, MultiOutputDataset, TaskDatasets
from polytask.methods import METHODS
from polytask.train import NonFiniteLossError
from polytask.train.callbacks import CSVLogger
from sections import sectioned

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def adult_slice():
    """2,000 training and 2,000 validation rows of the bundled Adult data (income, marital)."""
    loaded = pt.datasets.load("adult")
    assert isinstance(loaded.train, MultiOutputDataset)
    return loaded.tasks, loaded.train.subset(torch.arange(2000)), loaded.val.subset(torch.arange(2000))


# ------------------------------------------------------------------------------------- helpers
def synthetic(n: int, seed: int, width: int = 8) -> MultiOutputDataset:
    """A learnable three-task problem: linear regression, a half-plane, argmax of three features."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, width, generator=g)
    w = torch.linspace(-1.0, 1.0, width)
    return MultiOutputDataset(x, {
        "reg": x @ w + 0.05 * torch.randn(n, generator=g),
        "bin": (x[:, 0] + x[:, 1] > 0).float(),
        "cls": x[:, 2:5].argmax(1),
    })


SYN_TASKS = [pt.Task("reg", kind="regression"), pt.Task("bin", kind="binary"),
             pt.Task("cls", kind="multiclass", num_classes=3)]


def model_for(tasks, in_features: int = 8, hidden=(32,), seed: int = 0, **kwargs) -> pt.models.HardSharing:
    torch.manual_seed(seed)
    return pt.models.HardSharing(pt.encoders.MLP(in_features=in_features, hidden=list(hidden)), tasks, **kwargs)


def trainer_for(model, tasks, **kwargs) -> pt.Trainer:
    options = dict(epochs=3, batch_size=32, lr=1e-2, progress=False)
    options.update(kwargs)
    return pt.Trainer(model, tasks, **sectioned(**options))


def grads(params) -> list[torch.Tensor | None]:
    return [None if p.grad is None else p.grad.clone() for p in params]


def assert_close_list(a, b, atol=1e-6):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        assert u is not None and v is not None
        torch.testing.assert_close(u, v, atol=atol, rtol=1e-5)


# --------------------------------------------------------------------- multi-output regime
def test_multi_output_synthetic_learns_every_task():
    train, val = synthetic(800, seed=1), synthetic(400, seed=2)
    trainer = trainer_for(model_for(SYN_TASKS), SYN_TASKS, epochs=6, method="equal")
    report = trainer.fit(train, val)
    m = report.metrics
    assert set(m) == {"reg", "bin", "cls"}
    # chance: r2 = 0, accuracy 0.5 (binary) and about 1/3 (three balanced classes)
    assert m["reg"]["r2"] > 0.9
    assert m["bin"]["accuracy"] > 0.9
    assert m["cls"]["accuracy"] > 0.75
    # the loss went down for every task between the first and the last epoch
    for task in ("reg", "bin", "cls"):
        losses = [r["value"] for r in report.history if r["task"] == task and r["split"] == "val" and r["metric"] == "loss"]
        assert len(losses) == 6 and losses[-1] < 0.6 * losses[0]


def test_multi_output_adult_slice_beats_base_rate(adult_slice):
    tasks, train, val = adult_slice
    assert [t.name for t in tasks] == ["income", "marital"]
    model = model_for(tasks, in_features=train.x.shape[1])
    report = trainer_for(model, tasks, epochs=2, batch_size=64, method="equal").fit(train, val)
    for name in ("income", "marital"):
        base_rate = float(max(val.targets[name].mean(), 1 - val.targets[name].mean()))
        assert report.metrics[name]["accuracy"] > base_rate + 0.02, (name, report.metrics[name], base_rate)
        assert report.metrics[name]["auroc"] > 0.8
    assert report.metrics["income"]["accuracy"] > 0.76


# ---------------------------------------------------------------------- multi-input regime
MI_SIZES = {"a": 600, "b": 200, "c": 300}
MI_WIDTHS = {"a": 5, "b": 3, "c": 7}
MI_TASKS = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary"), pt.Task("c", kind="multiclass", num_classes=3)]


def multi_input(scale: float, seed: int) -> TaskDatasets:
    g = torch.Generator().manual_seed(seed)
    sets = {}
    for name, n in MI_SIZES.items():
        n = int(n * scale)
        x = torch.randn(n, MI_WIDTHS[name], generator=g)
        y = {"a": x.sum(1), "b": (x[:, 0] > x[:, 1]).float(), "c": x[:, :3].argmax(1)}[name]
        sets[name] = MultiOutputDataset(x, {name: y})
    return TaskDatasets(sets)


def multi_input_model(seed: int = 0) -> pt.models.HardSharing:
    torch.manual_seed(seed)
    stems = {t: nn.Linear(w, 16) for t, w in MI_WIDTHS.items()}
    return pt.models.HardSharing(pt.encoders.MLP(in_features=16, hidden=[32]), MI_TASKS, stems=stems)


def test_multi_input_trains_reports_every_task_and_samples_proportionally():
    train, val = multi_input(1.0, seed=3), multi_input(0.5, seed=4)
    assert train.sizes == MI_SIZES
    trainer = trainer_for(multi_input_model(), MI_TASKS, epochs=4, batch_size=20, method="equal",
                          sampler="proportional")
    report = trainer.fit(train, val)
    for task in MI_TASKS:
        assert set(report.metrics[task.name]) == {"loss", *task.metric_names}
        for split in ("train", "val"):
            for metric in ("loss", *task.metric_names):
                assert any(r["split"] == split and r["task"] == task.name and r["metric"] == metric for r in report.history)
    assert report.metrics["a"]["r2"] > 0.8
    assert report.metrics["b"]["accuracy"] > 0.8
    assert report.metrics["c"]["accuracy"] > 0.6
    # every step trained exactly the one task whose data set it drew from
    steps_per_epoch = sum(math.ceil(n / 20) for n in MI_SIZES.values())
    assert trainer.step_index == 4 * steps_per_epoch
    assert len(trainer.callback(CSVLogger).steps) == trainer.step_index
    counts = {t: sum(s["task"] == t for s in trainer.callback(CSVLogger).steps) for t in MI_SIZES}
    total = sum(MI_SIZES.values())
    for t, n in MI_SIZES.items():
        assert abs(counts[t] / trainer.step_index - n / total) < 0.1, counts
    # predict routes the input through the task's stem and returns every task
    preds = trainer.predict(val.datasets["b"].x, task="b")
    assert set(preds) == {"a", "b", "c"} and preds["b"].shape == (100,)


def test_proportional_sampler_frequencies():
    sampler = SAMPLERS.create("proportional")
    sampler.setup(MI_SIZES)
    g = torch.Generator().manual_seed(0)
    draws = [sampler.sample(g) for _ in range(6000)]
    total = sum(MI_SIZES.values())
    for t, n in MI_SIZES.items():
        assert abs(draws.count(t) / len(draws) - n / total) < 0.02


# ---------------------------------------------------------------------------- missing labels
def test_fully_masked_task_gets_zero_weight_and_no_gradient():
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]
    model = model_for(tasks, in_features=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 4, generator=g)
    targets = {"a": torch.randn(16, generator=g), "b": torch.full((16,), float("nan"))}
    masks = {"b": torch.zeros(16, dtype=torch.bool)}
    out = model(x)
    losses = {t.name: t.loss(out[t.name], targets[t.name], masks.get(t.name)) for t in tasks}
    assert losses["b"] is None and losses["a"] is not None

    engine = pt.Engine("equal", model.shared_parameters())
    weights = engine.backward(losses).weights
    assert weights == {"a": 1.0, "b": 0.0}
    for p in model.heads["b"].parameters():
        assert p.grad is None or not p.grad.any()
    assert all(p.grad is not None and p.grad.any() for p in model.heads["a"].parameters())
    got = grads(model.shared_parameters())

    # the shared gradient is task a's alone
    model.zero_grad(set_to_none=True)
    F.mse_loss(model(x)["a"], targets["a"]).backward()
    assert_close_list(got, grads(model.shared_parameters()))


@pytest.mark.parametrize("method", ["equal", "mgda", "pcgrad"])
def test_fully_masked_task_inactive_for_every_kind_of_method(method):
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="regression"), pt.Task("c", kind="binary")]
    model = model_for(tasks, in_features=4)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(12, 4, generator=g)
    out = model(x)
    losses = {"a": tasks[0].loss(out["a"], torch.randn(12, generator=g)),
              "b": tasks[1].loss(out["b"], torch.randn(12, generator=g), torch.zeros(12, dtype=torch.bool)),
              "c": tasks[2].loss(out["c"], torch.ones(12))}
    engine = pt.Engine(METHODS.create(method), model.shared_parameters())  # sets the method up from the losses
    weights = engine.backward(losses).weights
    assert weights["b"] == 0.0 and set(weights) == {"a", "b", "c"}
    assert all(p.grad is None or not p.grad.any() for p in model.heads["b"].parameters())


def test_partially_masked_loss_is_mean_over_labelled_samples():
    g = torch.Generator().manual_seed(7)
    mask = torch.tensor([True, False, True, True, False, True, False, True])
    for task, pred, y in (
        (pt.Task("r", kind="regression"), torch.randn(8, generator=g), torch.randn(8, generator=g)),
        (pt.Task("b", kind="binary"), torch.randn(8, generator=g), (torch.rand(8, generator=g) > 0.5).float()),
        (pt.Task("m", kind="multiclass", num_classes=4), torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g)),
    ):
        pred = pred.requires_grad_()
        if y.is_floating_point():
            y = torch.where(mask, y, torch.full_like(y, float("nan")))  # unlabelled values must not leak in
        loss = task.loss(pred, y, mask)
        if task.kind == "regression":
            per_sample = (pred.detach() - y) ** 2
        elif task.kind == "binary":
            per_sample = F.binary_cross_entropy_with_logits(pred.detach(), y, reduction="none")
        else:
            per_sample = F.cross_entropy(pred.detach(), y, reduction="none")
        expected = per_sample[mask].sum() / mask.sum()
        torch.testing.assert_close(loss.detach(), expected)
        (grad,) = torch.autograd.grad(loss, pred)
        assert torch.isfinite(grad).all()
        assert not grad[~mask].any(), "unlabelled samples must get no gradient"


def test_trainer_with_missing_labels_never_updates_an_unlabelled_head():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(256, 6, generator=g)
    a = x[:, 0] - x[:, 1]
    b = torch.full((256,), float("nan"))  # task b: no label in the training data at all
    mask_b = torch.zeros(256, dtype=torch.bool)
    c = (x[:, 2] > 0).float()
    mask_c = torch.arange(256) % 3 != 0  # task c: a third of the labels missing
    c[~mask_c] = float("nan")
    train = MultiOutputDataset(x, {"a": a, "b": b, "c": c}, {"b": mask_b, "c": mask_c})
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary"), pt.Task("c", kind="binary")]
    model = model_for(tasks, in_features=6)
    head_b = {k: v.clone() for k, v in model.heads["b"].state_dict().items()}
    trainer = trainer_for(model, tasks, epochs=3, method="equal")
    with pytest.raises(DataError, match="task 'b' has no labelled row"):  # a task that cannot train is an error
        trainer.fit(train)
    mask_b[:8] = True  # eight labels, all in the first batches of the shuffled epoch at most
    b[:8] = 1.0
    report = trainer.fit(MultiOutputDataset(x, {"a": a, "b": b, "c": c}, {"b": mask_b, "c": mask_c}))
    steps = trainer.callback(CSVLogger).steps
    trained_b = {s["step"] for s in steps if s["task"] == "b"}
    assert 0 < len(trained_b) < trainer.step_index  # b trains only in the steps that hold one of its labels
    assert head_b  # (the per-step no-gradient check for unlabelled tasks is test_fully_masked_task_...)
    assert all(math.isfinite(s["loss"]) for s in trainer.callback(CSVLogger).steps)
    assert report.metrics["c"]["accuracy"] > 0.8
    assert report.metrics["a"]["r2"] > 0.8


# ---------------------------------------------------------------------------- static weights
def test_static_weights_gradient_equals_autograd_of_weighted_sum():
    tasks = [pt.Task("reg", kind="regression"), pt.Task("bin", kind="binary"), pt.Task("cls", kind="multiclass", num_classes=3)]
    model = model_for(tasks, hidden=(16, 8))
    data = synthetic(32, seed=9)
    lambdas = {"reg": 0.25, "bin": 2.0, "cls": 0.7}
    shared, private = list(model.shared_parameters()), [p for t in tasks for p in model.task_parameters(t.name)]

    out = model(data.x)
    losses = {t.name: t.loss(out[t.name], t.cast_targets(data.targets[t.name])) for t in tasks}
    method = METHODS.create("static", weights=lambdas)
    method.setup(list(lambdas))
    weights = pt.backward(losses, shared, method).weights
    assert weights == pytest.approx(lambdas)
    got_shared, got_private = grads(shared), grads(private)

    model.zero_grad(set_to_none=True)
    out = model(data.x)
    total = sum(lambdas[t.name] * t.loss(out[t.name], t.cast_targets(data.targets[t.name])) for t in tasks)
    total.backward()
    assert_close_list(got_shared, grads(shared))
    assert_close_list(got_private, grads(private))
    # and not trivially: with equal weights the shared gradient differs
    model.zero_grad(set_to_none=True)
    out = model(data.x)
    sum(t.loss(out[t.name], t.cast_targets(data.targets[t.name])) for t in tasks).backward()
    assert not torch.allclose(got_shared[0], shared[0].grad)


def test_static_defaults_to_task_weights_in_trainer():
    tasks = [pt.Task("reg", kind="regression", weight=0.5), pt.Task("bin", kind="binary", weight=3.0),
             pt.Task("cls", kind="multiclass", num_classes=3)]
    trainer = trainer_for(model_for(tasks), tasks, epochs=1, method="static")
    trainer.fit(synthetic(64, seed=10))
    seen = {(s["task"], s["weight"]) for s in trainer.callback(CSVLogger).steps}
    assert seen == {("reg", 0.5), ("bin", 3.0), ("cls", 1.0)}


# -------------------------------------------------------------------------- optimizer groups
def test_per_task_lr_and_weight_decay_become_param_groups():
    tasks = [pt.Task("reg", kind="regression", lr=0.05, weight_decay=0.1), pt.Task("bin", kind="binary"),
             pt.Task("cls", kind="multiclass", num_classes=3, lr=0.002)]
    model = model_for(tasks)
    trainer = pt.Trainer(model, tasks, optim={"lr": 1e-3, "weight_decay": 1e-4, "optimizer": "adamw"}, run={"progress": False})
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"shared", "task:reg", "task:cls"}  # bin has no settings of its own: the global group
    assert (groups["task:reg"]["lr"], groups["task:reg"]["weight_decay"]) == (0.05, 0.1)
    assert (groups["task:cls"]["lr"], groups["task:cls"]["weight_decay"]) == (0.002, 1e-4)
    assert (groups["shared"]["lr"], groups["shared"]["weight_decay"]) == (1e-3, 1e-4)
    for name in ("reg", "cls"):
        assert {id(p) for p in groups[f"task:{name}"]["params"]} == {id(p) for p in model.task_parameters(name)}
    assert {id(p) for p in groups["shared"]["params"]} == (
        {id(p) for p in model.shared_parameters()} | {id(p) for p in model.task_parameters("bin")})


# ------------------------------------------------------------------------------ run directory
def test_run_directory_contract(tmp_path):
    train, val, test = synthetic(256, seed=11), synthetic(128, seed=12), synthetic(128, seed=13)
    baselines = {"reg": {"rmse": 0.5}, "bin": {"accuracy": 0.8}, "cls": {"accuracy": 0.7}}
    out = tmp_path / "run"
    trainer = trainer_for(model_for(SYN_TASKS), SYN_TASKS, epochs=2, output_dir=out, baselines=baselines)
    report = trainer.fit(train, val, test)

    with open(out / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["epoch", "split", "task", "metric", "value"]
    assert {r["split"] for r in rows} == {"train", "val"}
    assert {r["epoch"] for r in rows} == {"1", "2"}
    assert {r["task"] for r in rows} == {"reg", "bin", "cls"}
    assert {"loss", "rmse", "accuracy", "weight"} <= {r["metric"] for r in rows}

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"reg", "bin", "cls"}
    assert summary["tasks"] == report.metrics and summary["split"] == "test"
    assert summary["baselines"] == baselines
    main = {t.name: t.main_metric for t in SYN_TASKS}
    assert summary["delta_m"] == pytest.approx(pt.delta_m(summary["tasks"], baselines, main))

    png = (out / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    best = torch.load(out / "checkpoints" / "best.pt", weights_only=True)
    last = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert set(best["model"]) == set(trainer.model.state_dict())
    assert last["epoch"] == 2 and last["step"] == 2 * math.ceil(256 / 32)
    for k, v in last["model"].items():
        assert v.shape == trainer.model.state_dict()[k].shape
    # no temporary files left behind by the atomic writes
    assert not [p.name for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_early_stopping_with_patience():
    # the validation targets are the negation of the training targets: the better the model fits
    # the training data, the worse the validation loss gets after the first epoch
    g = torch.Generator().manual_seed(14)
    x = torch.randn(256, 4, generator=g)
    train = MultiOutputDataset(x, {"r": x.sum(1)})
    val = MultiOutputDataset(x[:128], {"r": -x[:128].sum(1)})
    tasks = [pt.Task("r", kind="regression")]
    trainer = trainer_for(model_for(tasks, in_features=4), tasks, epochs=20, patience=2)
    report = trainer.fit(train, val)
    assert report.summary["epochs_run"] == 3 < 20
    assert report.best_epoch == 1
    assert max(r["epoch"] for r in report.history) == 3


def test_monitor_metric_picks_best_epoch_and_restores_it(tmp_path, monkeypatch):
    monkeypatch.setattr("polytask.train.callbacks.builtin.plot_training", lambda *args: None)
    train, val = synthetic(256, seed=15), synthetic(128, seed=16)
    trainer = trainer_for(model_for(SYN_TASKS), SYN_TASKS, epochs=3, monitor="cls/accuracy", output_dir=tmp_path / "r")
    report = trainer.fit(train, val)
    accs = {r["epoch"]: r["value"] for r in report.history if r["split"] == "val" and r["task"] == "cls" and r["metric"] == "accuracy"}
    assert report.best_epoch == max(accs, key=lambda e: (accs[e], -e))
    best = torch.load(tmp_path / "r" / "checkpoints" / "best.pt", weights_only=True)
    assert best["epoch"] == report.best_epoch
    assert all(torch.equal(v, trainer.model.state_dict()[k]) for k, v in best["model"].items())


# ------------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("regime", ["multi_output", "multi_input"])
def test_resume_continues_exactly(tmp_path, regime, monkeypatch):
    monkeypatch.setattr("polytask.train.callbacks.builtin.plot_training", lambda *args: None)  # plots are tested elsewhere
    if regime == "multi_output":
        train, val, tasks = synthetic(200, seed=17), synthetic(64, seed=18), SYN_TASKS

        def build():
            torch.manual_seed(0)
            encoder = pt.encoders.MLP(in_features=8, hidden=[16], dropout=0.2)  # dropout: the RNG must be restored
            return pt.models.HardSharing(encoder, tasks)
    else:
        train, val, tasks = multi_input(0.3, seed=19), multi_input(0.2, seed=20), MI_TASKS
        build = multi_input_model

    def run(epochs, out, resume=False):
        trainer = pt.Trainer(build(), tasks, method="uncertainty", output_dir=out, resume=resume, seed=3,
                             loop={"epochs": epochs, "batch_size": 32}, optim={"lr": 1e-2}, run={"progress": False})
        trainer.fit(train, val)
        return trainer

    full = run(4, tmp_path / "full")
    run(2, tmp_path / "split")
    resumed = run(4, tmp_path / "split", resume=True)
    assert resumed.epoch == 4 and resumed.step_index == full.step_index
    a = torch.load(tmp_path / "full" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert b["epoch"] == 4
    # model, optimizer, method (learned log-variances), engine, sampler, RNG streams, history
    assert a.pop("train_seconds") > 0 and b.pop("train_seconds") > 0  # wall-clock time, summed over segments
    assert_same(a, b)
    for k, v in full.model.state_dict().items():  # the restored best model, too
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    assert full.history == resumed.history
    assert [s["task"] for s in full.callback(CSVLogger).steps] == [s["task"] for s in resumed.callback(CSVLogger).steps]


def assert_same(a, b, where="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def test_resume_without_checkpoint_and_existing_run_are_refused(tmp_path):
    train = synthetic(64, seed=21)
    with pytest.raises(pt.ConfigError, match="cannot resume"):
        trainer_for(model_for(SYN_TASKS), SYN_TASKS, epochs=1, output_dir=tmp_path / "r", resume=True).fit(train)
    trainer_for(model_for(SYN_TASKS), SYN_TASKS, epochs=1, output_dir=tmp_path / "r").fit(train)
    before = {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}
    with pytest.raises(pt.ConfigError, match="already exists"):
        trainer_for(model_for(SYN_TASKS), SYN_TASKS, epochs=1, output_dir=tmp_path / "r").fit(train)
    assert before == {p: p.read_bytes() for p in (tmp_path / "r").rglob("*") if p.is_file()}


# ----------------------------------------------------------------------- predict and errors
def test_predict_returns_every_task_with_the_right_shape():
    tasks = [*SYN_TASKS, pt.Task("tags", kind="multilabel", num_classes=4)]
    data = synthetic(64, seed=22)
    data.targets["tags"] = (data.x[:, :4] > 0).float()
    trainer = trainer_for(model_for(tasks), tasks, epochs=1)
    trainer.fit(data)
    preds = trainer.predict(torch.randn(50, 8), batch_size=16)  # several chunks
    assert set(preds) == {"reg", "bin", "cls", "tags"}
    assert preds["reg"].shape == (50,) and preds["reg"].is_floating_point()
    assert preds["bin"].shape == (50,) and ((preds["bin"] >= 0) & (preds["bin"] <= 1)).all()
    assert preds["cls"].shape == (50,) and preds["cls"].dtype == torch.long and preds["cls"].max() < 3
    assert preds["tags"].shape == (50, 4) and ((preds["tags"] >= 0) & (preds["tags"] <= 1)).all()
    # batched prediction equals one big forward pass
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    small, big = trainer.predict(x, batch_size=7), trainer.predict(x, batch_size=1000)
    for t in small:
        torch.testing.assert_close(small[t], big[t])


class WrongWidth(nn.Module):
    out_features = 8

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 5)

    def forward(self, x):
        return self.linear(x)


def test_user_encoder_with_wrong_output_shape_raises_shape_error():
    model = pt.models.HardSharing(WrongWidth(), SYN_TASKS)
    with pytest.raises(pt.ShapeError, match=r"WrongWidth.*\(batch, 8\)") as info:
        trainer_for(model, SYN_TASKS, epochs=1).fit(synthetic(32, seed=23))
    assert "(32, 5)" in str(info.value)


def test_head_with_wrong_width_raises_shape_error_naming_task():
    tasks = SYN_TASKS
    model = model_for(tasks, heads={"cls": nn.Linear(32, 2)})  # the task has 3 classes
    with pytest.raises(pt.ShapeError, match=r"task 'cls'.*\(batch, 3\)"):
        trainer_for(model, tasks, epochs=1).fit(synthetic(32, seed=24))


class NaNHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(32, 1)

    def forward(self, z):
        return self.linear(z) * float("nan")


def test_nan_loss_raises_non_finite_loss_error_naming_task():
    model = model_for(SYN_TASKS, heads={"bin": NaNHead()})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"\['bin'\]") as info:
        trainer_for(model, SYN_TASKS, epochs=1).fit(synthetic(32, seed=25))
    assert "reg" not in str(info.value) and "cls" not in str(info.value)
    assert isinstance(info.value, pt.PolytaskError)
    # the failing step did not update the model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())



@pytest.mark.parametrize("method", ["equal", "upgrad"])
def test_a_gradient_scaler_scales_and_unscales_to_the_unscaled_run(method):
    """The Trainer's fp16 path with the scaler on the CPU (fp16 itself needs CUDA; tests/test_cuda.py
    runs it there): the engine scales the losses by the scaler's scale and the scaler unscales
    before the step. A power-of-two scale that never overflows gives the unscaled run's parameters.
    (The scaler's scale tensor was never made, so every fp16 step failed in ``unscale_``.)"""
    data = synthetic(96, 0)
    states = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        trainer = trainer_for(model_for(SYN_TASKS), SYN_TASKS, method=method, epochs=2)
        trainer.scaler = scaler
        trainer.fit(data)
        states.append(trainer.model.state_dict())
    assert trainer.scaler.get_scale() == 2.0 ** 10  # no step overflowed, none grew it (growth after 2000)
    for key, value in states[0].items():
        torch.testing.assert_close(states[1][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_fit_frees_the_engines_kept_jacobian():
    trainer = trainer_for(model_for(SYN_TASKS), SYN_TASKS, method="upgrad", epochs=1)
    trainer.fit(synthetic(64, 0))
    assert trainer.engine.index > 0 and trainer.engine.kept_bytes == 0
