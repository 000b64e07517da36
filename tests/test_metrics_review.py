"""The metrics' values against references (sklearn where installed, else hand-computed values
stated in the test): balanced accuracy, NaN predictions, R² with a large mean, multiclass AUROC
of logits inside [0, 1], the tracker's state dict as a copy, and ``Trainer.evaluate`` called
mid-epoch or on unvalidated targets."""

from __future__ import annotations

import math

import pytest
import torch

import polytask as pt
from polytask.core.errors import DataError
from polytask.data import MultiOutputDataset, TaskDatasets
from polytask.metrics import TaskMetrics
from polytask.train.callbacks.base import Callback


def computed(task: pt.Task, pred: torch.Tensor, y: torch.Tensor, chunks: int = 1) -> dict[str, float]:
    tracker = TaskMetrics([task])
    for p, t in zip(pred.chunk(chunks), y.chunk(chunks)):
        tracker.update({task.name: p}, {task.name: t}, {}, None)
    return tracker.compute()[task.name]


# ------------------------------------------------------------------------ balanced accuracy
def test_binary_balanced_accuracy_is_the_mean_of_tpr_and_tnr():
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(1000, generator=g) < 0.3).float()
    logit = (y * 2 - 1) * 2 + torch.randn(1000, generator=g)
    pred = (logit > 0).long()
    tpr = int(((pred == 1) & (y == 1)).sum()) / int((y == 1).sum())
    tnr = int(((pred == 0) & (y == 0)).sum()) / int((y == 0).sum())
    task = pt.Task("b", kind="binary", metrics=("balanced_accuracy",))
    value = computed(task, logit, y, chunks=7)["balanced_accuracy"]
    assert value == pytest.approx((tpr + tnr) / 2, abs=1e-12)  # was 0.5: probabilities floored to class 0
    skm = pytest.importorskip("sklearn.metrics")
    assert value == pytest.approx(skm.balanced_accuracy_score(y.numpy(), pred.numpy()), abs=1e-12)
    # targets of one class only: the recall of that class (sklearn leaves the absent class out)
    ones = torch.ones(4)
    assert computed(task, torch.tensor([3.0, 3.0, 3.0, -3.0]), ones)["balanced_accuracy"] == pytest.approx(0.75)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_multiclass_balanced_accuracy_leaves_out_classes_absent_from_the_targets():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    pred = torch.tensor([0, 0, 3, 1, 1, 1, 2, 3])  # class 3 predicted, never a target
    task = pt.Task("m", kind="multiclass", num_classes=4, metrics=("balanced_accuracy",))
    value = computed(task, torch.nn.functional.one_hot(pred, 4).float() * 5, y)["balanced_accuracy"]
    assert value == pytest.approx((2 / 3 + 1 + 1 / 2) / 3)  # 0.7222; was 0.5417 (class 3's recall 0 averaged in)
    skm = pytest.importorskip("sklearn.metrics")
    assert value == pytest.approx(skm.balanced_accuracy_score(y.numpy(), pred.numpy()))


def test_multilabel_balanced_accuracy_is_the_mean_of_each_labels_balanced_accuracy():
    y = torch.zeros(100, 2)
    y[:5, 0] = 1  # label 0 rare, never predicted: TPR 0, TNR 1 -> 0.5
    y[:50, 1] = 1  # label 1 predicted exactly -> 1.0
    logit = torch.full((100, 2), -5.0)
    logit[:50, 1] = 5.0
    task = pt.Task("l", kind="multilabel", num_classes=2, metrics=("balanced_accuracy", "accuracy"))
    out = computed(task, logit, y)
    assert out["balanced_accuracy"] == pytest.approx(0.75)  # was 0.975, plain accuracy
    assert out["accuracy"] == pytest.approx(0.975)
    skm = pytest.importorskip("sklearn.metrics")
    pred = (logit > 0).long().numpy()
    reference = sum(skm.balanced_accuracy_score(y[:, j].numpy(), pred[:, j]) for j in range(2)) / 2
    assert out["balanced_accuracy"] == pytest.approx(reference)


# ------------------------------------------------------------------------ NaN predictions
@pytest.mark.parametrize("kind", ["binary", "multilabel"])
def test_a_nan_prediction_makes_the_tasks_metrics_nan_and_leaves_other_tasks_alone(kind):
    """One NaN row of 5000 re-applied a sigmoid to every probability of the flush (torchmetrics'
    "not all in [0, 1]" rule): accuracy 1.0 became 0.299. Now the task's metrics are NaN, the
    other task's are those of its rows, and the next epoch is clean."""
    g = torch.Generator().manual_seed(0)
    shape = (5000,) if kind == "binary" else (5000, 2)
    y = (torch.rand(shape, generator=g) < 0.3).float()
    logit = (y * 2 - 1) * 4 + 0.5 * torch.randn(shape, generator=g)
    metrics = ("accuracy", "f1", "auroc", "balanced_accuracy")
    bad = pt.Task("bad", kind=kind, num_classes=None if kind == "binary" else 2, metrics=metrics)
    good = pt.Task("good", kind=kind, num_classes=None if kind == "binary" else 2, metrics=metrics)
    tracker = TaskMetrics([bad, good])
    with_nan = logit.clone()
    with_nan.view(-1)[700] = float("nan")
    for rows in torch.arange(5000).chunk(50):
        tracker.update({"bad": with_nan[rows], "good": logit[rows]}, {"bad": y[rows], "good": y[rows]}, {}, None)
    result = tracker.compute()
    assert all(math.isnan(v) for v in result["bad"].values()) and set(result["bad"]) == set(metrics)
    assert result["good"]["accuracy"] == pytest.approx(1.0)
    assert result["good"]["f1"] == pytest.approx(1.0)
    tracker.reset()
    tracker.update({"bad": logit, "good": logit}, {"bad": y, "good": y}, {}, None)
    assert tracker.compute()["bad"] == tracker.compute()["good"]


def test_a_nan_or_infinite_multiclass_logit_and_a_nan_regression_value_give_nan_metrics():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (64,), generator=g)
    logits = torch.randn(64, 3, generator=g)
    task = pt.Task("m", kind="multiclass", num_classes=3, metrics=("accuracy", "f1", "auroc", "balanced_accuracy"))
    finite = computed(task, logits, y)
    assert not any(math.isnan(v) for v in finite.values())
    for value in (float("nan"), float("inf")):
        broken = logits.clone()
        broken[5, 1] = value
        assert all(math.isnan(v) for v in computed(task, broken, y).values()), value
    masked = logits.clone()
    masked[:, 2] = float("-inf")  # a class ruled out by −inf logits has a softmax: not NaN
    assert not any(math.isnan(v) for v in computed(task, masked, y).values())
    reg = pt.Task("r", kind="regression", metrics=("rmse", "mae", "r2"))
    values = torch.randn(64, generator=g)
    broken = values.clone()
    broken[3] = float("nan")
    assert all(math.isnan(v) for v in computed(reg, broken, values).values())


def test_a_nan_prediction_survives_a_mid_epoch_state_dict():
    task = pt.Task("b", kind="binary")
    first = TaskMetrics([task])
    first.update({"b": torch.tensor([float("nan"), 2.0])}, {"b": torch.tensor([1.0, 1.0])}, {}, None)
    second = TaskMetrics([task])
    second.load_state_dict(first.state_dict())
    second.update({"b": torch.tensor([2.0, -2.0])}, {"b": torch.tensor([1.0, 0.0])}, {}, None)
    assert math.isnan(second.compute()["b"]["accuracy"])


# ------------------------------------------------------------------------ R²
@pytest.mark.parametrize("mean, sd", [(5e3, 1.0), (1e5, 100.0)])
def test_r2_of_targets_with_a_large_mean_matches_the_two_pass_value(mean, sd):
    g = torch.Generator().manual_seed(0)
    y = mean + sd * torch.randn(100_000, generator=g, dtype=torch.float64)
    p = y + 0.5 * sd * torch.randn(100_000, generator=g, dtype=torch.float64)
    y32, p32 = y.float(), p.float()  # what the tracker receives
    reference = float(1 - ((y32.double() - p32.double()) ** 2).sum() / ((y32.double() - y32.double().mean()) ** 2).sum())
    task = pt.Task("r", kind="regression", metrics=("r2",))
    assert computed(task, p32, y32, chunks=50)["r2"] == pytest.approx(reference, abs=1e-6)  # was 0.952 (mean 5000)
    # standardised in the model's space: unscaled in float64
    scaled = pt.Task("r", kind="regression", metrics=("r2",), target_scaling=(mean, sd))
    value = computed(scaled, ((p - mean) / sd).float(), ((y - mean) / sd).float(), chunks=50)["r2"]
    skm = pytest.importorskip("sklearn.metrics")
    assert value == pytest.approx(skm.r2_score(y.numpy(), p.numpy()), abs=1e-5)


def test_r2_of_targets_in_small_units_and_of_constant_targets():
    g = torch.Generator().manual_seed(1)
    y = 1e-3 * torch.randn(50, generator=g)  # SS_tot ≈ 5·10⁻⁵: under torchmetrics' absolute 10⁻⁴ it gave 1.0
    p = y + 0.5e-3 * torch.randn(50, generator=g)
    yd, pd = y.double(), p.double()
    reference = float(1 - ((yd - pd) ** 2).sum() / ((yd - yd.mean()) ** 2).sum())
    task = pt.Task("r", kind="regression", metrics=("r2",))
    assert computed(task, p, y)["r2"] == pytest.approx(reference, rel=1e-6)
    constant = torch.full((50,), 0.1)
    assert computed(task, constant.clone(), constant)["r2"] == 1.0  # sklearn: exact predictions of a constant
    assert computed(task, constant + 0.01, constant)["r2"] == 0.0  # sklearn (force_finite): otherwise 0


# ------------------------------------------------------------------------ multiclass AUROC
def test_multiclass_auroc_ranks_softmax_probabilities_even_for_logits_inside_0_1():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (1000,), generator=g)
    logits = torch.rand(1000, 4, generator=g)
    logits[torch.arange(1000), y] = (logits[torch.arange(1000), y] + 0.3).clamp(max=1)
    task = pt.Task("m", kind="multiclass", num_classes=4, metrics=("auroc",))
    value = computed(task, logits, y, chunks=20)["auroc"]
    shifted = computed(task, logits + 10.0, y, chunks=20)["auroc"]  # the same softmax
    assert value == pytest.approx(shifted, abs=1e-5)  # was 0.7567 against 0.7781
    skm = pytest.importorskip("sklearn.metrics")
    assert value == pytest.approx(skm.roc_auc_score(y.numpy(), logits.softmax(1).numpy(), multi_class="ovr"), abs=1e-6)


# ------------------------------------------------------------------------ state dict
def test_the_tracker_state_dict_is_a_copy_both_ways():
    task = pt.Task("r", kind="regression", metrics=("mae", "r2"))
    a = TaskMetrics([task])
    a.update({"r": torch.ones(4)}, {"r": torch.zeros(4)}, {}, None)
    saved = a.state_dict()
    a.update({"r": torch.ones(4)}, {"r": torch.zeros(4)}, {}, None)
    a.state_dict()
    assert saved["metrics"]["r"]["mae"]["state"]["sum_abs_error"].item() == 4.0  # was 8.0: the live tensor
    b, c = TaskMetrics([task]), TaskMetrics([task])
    b.load_state_dict(saved)
    c.load_state_dict(saved)
    b.update({"r": torch.full((4,), 5.0)}, {"r": torch.zeros(4)}, {}, None)
    b.compute()
    assert c.compute()["r"]["mae"] == 1.0  # was 3.0: b's updates in c's tensors
    assert saved["metrics"]["r"]["mae"]["state"]["sum_abs_error"].item() == 4.0


# ------------------------------------------------------------------------ Trainer.evaluate
def test_evaluate_in_the_middle_of_an_epoch_leaves_the_epoch_and_the_training_mode_alone():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(640, 4, generator=g)
    train = MultiOutputDataset(x, {"r": x.sum(1)})
    xv = torch.randn(500, 4, generator=g)
    val = MultiOutputDataset(xv, {"r": 100 + xv.sum(1)})  # a huge validation loss
    tasks = [pt.Task("r", kind="regression")]

    class EvalAtStep5(Callback):
        def __init__(self, on: bool) -> None:
            self.on, self.modes = on, []

        def on_step_end(self, trainer, step):
            if self.on and step.index == 5:
                trainer.evaluate(val)
            self.modes.append((trainer.model.training, trainer.model.encoder.training))

    rows, modes = [], []
    for on in (False, True):
        torch.manual_seed(0)
        model = pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[16], dropout=0.3), tasks)
        callback = EvalAtStep5(on)
        trainer = pt.Trainer(model, tasks, loop={"epochs": 1, "batch_size": 64}, run={"progress": False},
                             callbacks=[callback])
        report = trainer.fit(train)
        rows.append([h["value"] for h in report.history if h["split"] == "train"])
        modes.append(callback.modes)
    assert rows[1] == rows[0]  # the train-loss row was 8852 against 3.5
    assert modes[1] == modes[0] == [(True, True)] * 10  # was eval mode (dropout off) after step 5
    # a module the user put in eval mode stays in it
    trainer.model.train()
    trainer.model.encoder.eval()
    trainer.evaluate(val)
    assert trainer.model.training and not trainer.model.encoder.training


def test_evaluate_validates_in_memory_targets_as_fit_does():
    torch.manual_seed(0)
    tasks = [pt.Task("bin", kind="binary"), pt.Task("reg", kind="regression")]
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[8]), tasks)
    trainer = pt.Trainer(model, tasks, loop={"epochs": 1, "batch_size": 32}, run={"progress": False})
    x = torch.randn(300, 4)
    labels = (x[:, 0] > 0).float()
    trainer.fit(MultiOutputDataset(x, {"bin": labels, "reg": x[:, 1]}))
    assert set(trainer.evaluate(MultiOutputDataset(x, {"bin": labels, "reg": x[:, 1]}))) == {"bin", "reg"}
    for bad, match in ((torch.randint(0, 3, (300,)).float(), r"must lie in \[0, 1\]"),
                       (torch.full((300,), 0.6), "integer labels"),
                       (torch.where(torch.arange(300) % 5 == 0, float("nan"), labels), "NaN")):
        with pytest.raises(DataError, match=match):  # gave numbers (accuracy 0.49 for labels {0, 1, 2})
            trainer.evaluate(MultiOutputDataset(x, {"bin": bad, "reg": x[:, 1]}))
        with pytest.raises(DataError, match=match):
            trainer.evaluate(TaskDatasets({"bin": MultiOutputDataset(x, {"bin": bad}),
                                           "reg": MultiOutputDataset(x, {"reg": x[:, 1]})}))
