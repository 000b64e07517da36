"""Per-task losses (registry and callables), custom metrics, num_classes inferred from labels."""

import copy
import dataclasses
import logging
import math
import pickle

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import BinaryPrecision

from polytask.core import LOSSES, DataError, InvalidParameterError, ShapeError, Task, infer_num_classes, register_loss
from polytask.core.losses import TaskLoss
from polytask.data.files import infer_classes_from_column, label_vocabulary, table_dataset
from polytask.data.tabular import TabularPreprocessor
from polytask.metrics import METRICS, TaskMetrics, register_metric


def _logits(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture
def scratch_registries():
    """Entries a test registers are removed afterwards (the registries are global)."""
    losses, metrics = set(LOSSES.names()), set(METRICS.names())
    yield
    for name in set(LOSSES.names()) - losses:
        del LOSSES._entries[name]
    for name in set(METRICS.names()) - metrics:
        del METRICS._specs[name]


# ------------------------------------------------------------------------------ named losses
def test_defaults_per_kind_are_torch_losses():
    x, y = _logits(6), torch.tensor([0.0, 1, 1, 0, 1, 0], dtype=torch.float64)
    assert Task("r", "regression").loss.name == "mse"
    assert torch.equal(Task("r", "regression").loss(x, y), F.mse_loss(x, y))
    assert torch.equal(Task("b", "binary").loss(x, y), F.binary_cross_entropy_with_logits(x, y))
    z, c = _logits(6, 4), torch.tensor([0, 3, 2, 1, 1, 0])
    assert torch.equal(Task("m", "multiclass", num_classes=4).loss(z, c), F.cross_entropy(z, c))
    ym = (_logits(6, 4, seed=1) > 0).double()
    assert Task("l", "multilabel", num_classes=4).loss.name == "bce"
    assert torch.equal(Task("l", "multilabel", num_classes=4).loss(z, ym), F.binary_cross_entropy_with_logits(z, ym))


def test_l1_and_huber_golden():
    p, y = torch.tensor([0.0, 1.0, 3.0]), torch.tensor([0.5, -1.0, 3.0])  # errors 0.5, 2, 0
    assert Task("r", "regression", loss="l1").loss(p, y).item() == pytest.approx((0.5 + 2 + 0) / 3)
    # δ = 1: ½·0.5² = 0.125 (inside), 1·(2 − ½) = 1.5 (outside), 0
    assert Task("r", "regression", loss="huber").loss(p, y).item() == pytest.approx((0.125 + 1.5) / 3)
    # δ = 0.4: 0.4·(0.5 − 0.2) = 0.12, 0.4·(2 − 0.2) = 0.72
    huber = Task("r", "regression", loss={"name": "huber", "delta": 0.4}).loss
    assert huber(p, y).item() == pytest.approx((0.12 + 0.72) / 3)
    x, t = _logits(50), _logits(50, seed=1) * 3
    assert torch.equal(huber(x, t), F.huber_loss(x, t, delta=0.4))


def test_bce_pos_weight_golden():
    x, y = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    p = torch.sigmoid(x)
    expected = -(3.0 * y * torch.log(p) + (1 - y) * torch.log(1 - p)).mean()
    got = Task("b", "binary", loss={"name": "bce", "pos_weight": 3.0}).loss(x, y)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    # multilabel: one weight per label
    z, t = _logits(5, 3), (_logits(5, 3, seed=2) > 0).double()
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    q = torch.sigmoid(z)
    expected = -(w * t * torch.log(q) + (1 - t) * torch.log(1 - q)).mean()
    got = Task("l", "multilabel", num_classes=3, loss={"name": "bce", "pos_weight": [1.0, 2.0, 0.5]}).loss(z, t)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def test_ce_class_weights_and_label_smoothing_golden():
    z, c = _logits(7, 3), torch.tensor([0, 1, 2, 2, 1, 0, 2])
    logp = torch.log_softmax(z, 1)
    nll = -logp[torch.arange(7), c]
    w = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    expected = (w[c] * nll).sum() / w[c].sum()  # torch's weighted mean
    got = Task("m", "multiclass", num_classes=3, loss={"name": "ce", "class_weights": [1, 2, 4]}).loss(z, c)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)
    eps = 0.1  # target (1 − ε) on its class + ε/C on every class
    expected = ((1 - eps) * nll + eps / 3 * -logp.sum(1)).mean()
    got = Task("m", "multiclass", num_classes=3, loss={"name": "ce", "label_smoothing": eps}).loss(z, c)
    assert got.item() == pytest.approx(expected.item(), rel=1e-12)


def _focal_reference(p_t: torch.Tensor, gamma: float, alpha_t: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Lin et al. (ICCV 2017), eq. 5: FL(p_t) = −α_t (1 − p_t)^γ log(p_t), from probabilities."""
    return (-alpha_t * (1 - p_t) ** gamma * torch.log(p_t)).mean()


def test_focal_binary_golden():
    # a logit 0 gives p = ½ whatever the label: (½)² · ln 2
    assert Task("b", "binary", loss="focal").loss(torch.zeros(1), torch.ones(1)).item() == pytest.approx(0.25 * math.log(2))
    x = torch.tensor([2.0, -1.0, 0.5, -3.0], dtype=torch.float64)
    y = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    p = torch.sigmoid(x)
    p_t = torch.where(y == 1, p, 1 - p)
    task = Task("b", "binary", loss={"name": "focal", "gamma": 2.0})
    assert task.loss(x, y).item() == pytest.approx(_focal_reference(p_t, 2.0).item(), rel=1e-12)
    alpha_t = torch.where(y == 1, 0.25, 0.75)
    task = Task("b", "binary", loss={"name": "focal", "gamma": 1.5, "alpha": 0.25})
    assert task.loss(x, y).item() == pytest.approx(_focal_reference(p_t, 1.5, alpha_t).item(), rel=1e-12)
    # γ = 0 (no α) is binary cross-entropy
    assert Task("b", "binary", loss={"name": "focal", "gamma": 0}).loss(x, y).item() == pytest.approx(
        F.binary_cross_entropy_with_logits(x, y).item(), rel=1e-12)


def test_focal_multiclass_and_multilabel_golden():
    z, c = _logits(6, 4), torch.tensor([0, 3, 2, 1, 1, 0])
    p_t = torch.softmax(z, 1)[torch.arange(6), c]
    task = Task("m", "multiclass", num_classes=4, loss={"name": "focal", "gamma": 2.0})
    assert task.loss(z, c).item() == pytest.approx(_focal_reference(p_t, 2.0).item(), rel=1e-12)
    alpha = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    task = Task("m", "multiclass", num_classes=4, loss={"name": "focal", "gamma": 1.0, "alpha": alpha.tolist()})
    assert task.loss(z, c).item() == pytest.approx(_focal_reference(p_t, 1.0, alpha[c]).item(), rel=1e-12)
    assert Task("m", "multiclass", num_classes=4, loss={"name": "focal", "gamma": 0.0}).loss(z, c).item() == pytest.approx(
        F.cross_entropy(z, c).item(), rel=1e-12)
    t = (_logits(6, 4, seed=3) > 0).double()
    q = torch.sigmoid(z)
    p_t = torch.where(t == 1, q, 1 - q)
    per_label = torch.tensor([0.5, 0.25, 0.75, 1.0], dtype=torch.float64)  # α of each label's positives
    task = Task("l", "multilabel", num_classes=4, loss={"name": "focal", "alpha": per_label.tolist()})
    alpha_t = torch.where(t == 1, per_label, 1 - per_label)
    assert task.loss(z, t).item() == pytest.approx(_focal_reference(p_t, 2.0, alpha_t).item(), rel=1e-12)


GRADIENT_CASES = [
    ("regression", None, "mse"), ("regression", None, "l1"), ("regression", None, {"name": "huber", "delta": 0.5}),
    ("binary", None, {"name": "bce", "pos_weight": 2.0}), ("binary", None, {"name": "focal", "alpha": 0.25}),
    ("multiclass", 3, {"name": "ce", "class_weights": [1, 2, 3], "label_smoothing": 0.1}),
    ("multiclass", 3, {"name": "focal", "gamma": 0.0}), ("multiclass", 3, {"name": "focal", "alpha": [1, 1, 2]}),
    ("multilabel", 3, "focal"),
]


def _batch(kind: str, n: int, c: int | None):
    pred = _logits(n, c) if c else _logits(n)
    if kind == "regression":
        target = _logits(n, seed=5)
    elif kind == "multiclass":
        target = torch.arange(n) % c
    else:
        target = (_logits(*pred.shape, seed=5) > 0).double()
    return pred.float().requires_grad_(), target.long() if kind == "multiclass" else target.float()


@pytest.mark.parametrize("kind, classes, loss", GRADIENT_CASES)
def test_gradient_flows_and_mask_respected(kind, classes, loss):
    task = Task("t", kind, num_classes=classes, loss=loss)
    pred, target = _batch(kind, 8, classes)
    value = task.loss(pred, target)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    mask = torch.tensor([True, False, True, True, False, True, False, True])
    pred.grad = None
    masked = task.loss(pred, target, mask)
    masked.backward()
    assert masked.item() == pytest.approx(task.loss(pred.detach()[mask], target[mask]).item(), rel=1e-6)
    assert (pred.grad[~mask] == 0).all()  # unlabelled rows get no gradient
    assert task.loss(pred, target, torch.zeros(8, dtype=torch.bool)) is None


def test_half_precision_predictions_are_upcast():
    task = Task("r", "regression", loss={"name": "huber", "delta": 0.5})
    p, y = torch.randn(5).bfloat16(), torch.randn(5)
    assert task.loss(p, y).dtype == torch.float32


@pytest.mark.parametrize("kind", ["regression", "binary"])
def test_float_targets_take_the_predictions_dtype(kind):
    """A float64 model with float32 targets: the loss sees float64 targets (CUDA's MSE and BCE
    backward kernels refuse the mixed pair, found on a GPU; the CPU's promote silently)."""
    seen = []

    def loss(prediction, target):
        seen.append(target.dtype)
        return (prediction - target).pow(2).mean()
    p = torch.randn(6, dtype=torch.float64, requires_grad=True)
    y = (torch.rand(6) > 0.5).float()
    assert Task("t", kind, loss=loss).loss(p, y).dtype == torch.float64 and seen == [torch.float64]
    value = Task("t", kind).loss(p, y)
    assert value.dtype == torch.float64
    value.backward()
    assert p.grad is not None and p.grad.dtype == torch.float64


def test_built_from_a_mapping_and_written_back():
    task = Task("cls", "multiclass", num_classes=3, loss={"name": "focal", "gamma": 2.0})
    assert isinstance(task.loss, TaskLoss) and task.loss.name == "focal" and task.loss.params == {"gamma": 2.0}
    assert task.loss.to_config() == {"name": "focal", "gamma": 2.0}
    assert Task("cls", "multiclass", num_classes=3, loss=task.loss.to_config()) == task
    assert Task("r", "regression", loss="l1").loss.to_config() == "l1"
    assert Task("r", "regression").loss.to_config() is None  # the default: nothing to write
    weights = Task("m", "multiclass", num_classes=2, loss={"name": "ce", "class_weights": torch.tensor([1.0, 3.0])})
    assert weights.loss.to_config() == {"name": "ce", "class_weights": [1.0, 3.0]}
    # copies, pickles and dataclasses.replace rebuild the loss (validated again)
    assert pickle.loads(pickle.dumps(task)) == task and copy.deepcopy(task) == task and hash(task) == hash(copy.copy(task))
    assert dataclasses.replace(task, num_classes=5).loss.num_classes == 5
    with pytest.raises(InvalidParameterError, match=r"one weight per class \(3\); found 2"):
        dataclasses.replace(weights, num_classes=3)
    assert Task("r", "regression", loss="l1") != Task("r", "regression")


@pytest.mark.parametrize("kind, classes, loss, error, match", [
    ("regression", None, "focal", InvalidParameterError,
     r"loss 'focal' does not apply to regression task 'y'; losses for regression: huber, l1, mse"),
    ("binary", None, "ce", InvalidParameterError, r"losses for binary: bce, focal"),
    ("binary", None, "focla", InvalidParameterError, r"unknown loss 'focla'. Did you mean 'focal'\?"),
    ("binary", None, {"name": "focal", "gama": 2}, InvalidParameterError,
     r"loss 'focal' of task 'y' has no parameter 'gama'. Did you mean 'gamma'\?"),
    ("multiclass", 5, {"name": "ce", "class_weights": [1, 2, 3]}, InvalidParameterError,
     r"`class_weights` of loss 'ce' of task 'y' must list one weight per class \(5\); found 3"),
    ("multiclass", 2, {"name": "ce", "class_weights": [0, 0]}, InvalidParameterError, "all zero"),
    ("multiclass", 2, {"name": "ce", "class_weights": [1, -1]}, InvalidParameterError, r"class_weights`.*\[1\] must lie in"),
    ("multiclass", 3, {"name": "ce", "label_smoothing": 1.0}, InvalidParameterError, r"label_smoothing.*\[0, 1\)"),
    ("multiclass", 3, {"name": "focal", "alpha": 0.25}, InvalidParameterError, "one weight per class for a multiclass task"),
    ("binary", None, {"name": "focal", "alpha": 1.5}, InvalidParameterError, r"`alpha` of loss 'focal' of task 'y'.*\[0, 1\]"),
    ("binary", None, {"name": "focal", "gamma": -1}, InvalidParameterError, r"`gamma`.*\[0, inf\]"),
    ("binary", None, {"name": "bce", "pos_weight": 0}, InvalidParameterError, r"`pos_weight`.*\(0, inf\]"),
    ("binary", None, {"name": "bce", "pos_weight": [1.0, 2.0]}, InvalidParameterError, "finite number"),
    ("regression", None, {"name": "huber", "delta": float("nan")}, InvalidParameterError, "finite number"),
    ("regression", None, {"gamma": 2}, InvalidParameterError, r"needs a `name`, e.g. \{name: focal"),
    ("regression", None, nn.MSELoss, InvalidParameterError, r"the class MSELoss; give an instance \(MSELoss\(\)\)"),
    ("regression", None, 3, InvalidParameterError, "must be a loss name, a mapping"),
])
def test_invalid_losses(kind, classes, loss, error, match):
    with pytest.raises(error, match=match):
        Task("y", kind, num_classes=classes, loss=loss)


# --------------------------------------------------------------------------- callable losses
@pytest.mark.parametrize("kind, classes, pred_shape, target_dtype", [
    ("regression", None, (3,), torch.float32), ("binary", None, (3,), torch.float32),
    ("multiclass", 4, (3, 4), torch.int64), ("multilabel", 4, (3, 4), torch.float32),
])
def test_callable_loss_receives_documented_shapes_after_masking(kind, classes, pred_shape, target_dtype):
    seen = []

    def loss(prediction, target):
        seen.append((tuple(prediction.shape), target.dtype, tuple(target.shape)))
        return prediction.sum() * 0 + 1.5

    task = Task("t", kind, num_classes=classes, loss=loss)
    pred, target = _batch(kind, 5, classes)
    assert task.loss(pred, target, torch.tensor([True, False, True, True, False])).item() == 1.5
    assert seen == [(pred_shape, target_dtype, pred_shape[:1] if kind != "multilabel" else pred_shape)]
    assert task.loss.custom and task.loss.to_config() is None


def test_module_instance_as_loss():
    task = Task("r", "regression", loss=nn.SmoothL1Loss(beta=0.5))
    p, y = torch.tensor([0.0, 2.0]), torch.tensor([0.1, 0.0])
    assert task.loss(p, y).item() == pytest.approx(F.smooth_l1_loss(p, y, beta=0.5).item())


@pytest.mark.parametrize("fn, error, match", [
    (lambda p, y: (p - y) ** 2, ShapeError, r"loss '.*' of task 'price' returned shape \(4,\).*expected a scalar.*\.mean\(\)"),
    (lambda p, y: (p * float("nan")).mean(), InvalidParameterError, r"task 'price' returned nan for finite predictions"),
    (lambda p, y: ((p - y) ** 2).mean().item(), InvalidParameterError, r"task 'price' returned float; expected a 0-dim tensor"),
    (lambda p, y: ((p - y) ** 2).mean().detach(), InvalidParameterError, r"task 'price' does not depend on the prediction"),
    (lambda p, y: (p > y).sum(), InvalidParameterError, r"task 'price' returned dtype torch.int64"),
])
def test_bad_callable_loss_is_named_at_first_step(fn, error, match):
    task = Task("price", "regression", loss=fn)
    with pytest.raises(error, match=match):
        task.loss(torch.randn(4, requires_grad=True), torch.randn(4))


def test_callable_checked_until_a_gradient_step_then_trusted():
    calls = {"n": 0}

    def loss(prediction, target):
        calls["n"] += 1
        return ((prediction - target) ** 2).mean()

    task = Task("r", "regression", loss=loss)
    with torch.no_grad():  # an evaluation first: no gradient to check yet
        task.loss(torch.randn(4), torch.randn(4))
    assert not task.loss._grad_checked
    task.loss(torch.randn(4, requires_grad=True), torch.randn(4))
    assert task.loss._grad_checked and calls["n"] == 2


def test_register_loss_usable_by_name(scratch_registries):
    @register_loss("log_cosh", kinds=("regression",))
    def log_cosh(task: str, scale: float = 1.0):
        """log(cosh(scale·error)) / scale²."""
        return lambda p, y: (torch.log(torch.cosh(scale * (p - y))) / scale**2).mean()

    task = Task("r", "regression", loss={"name": "log_cosh", "scale": 2.0})
    p, y = torch.tensor([0.5, -1.0]), torch.zeros(2)
    assert task.loss(p, y).item() == pytest.approx(((torch.log(torch.cosh(2 * p)) / 4).mean()).item())
    assert "log_cosh" in LOSSES.for_kind("regression") and LOSSES.describe("log_cosh").startswith("log(cosh")
    assert list(LOSSES.parameters("log_cosh")) == ["scale"]  # `task` is filled in, not a parameter
    with pytest.raises(InvalidParameterError, match="registered already; pass overwrite=True"):
        register_loss("log_cosh", kinds="regression")
    with pytest.raises(InvalidParameterError, match="'regresion' is not a task kind. Did you mean 'regression'"):
        register_loss("other", kinds=("regresion",))
    with pytest.raises(InvalidParameterError, match="does not apply to binary"):
        Task("b", "binary", loss="log_cosh")


# ------------------------------------------------------------------------------ custom metrics
def test_register_metric_with_a_torchmetrics_class(scratch_registries):
    register_metric("precision", BinaryPrecision, higher_is_better=True, kinds=("binary",))
    assert METRICS.higher_is_better("precision") and METRICS.kinds("precision") == ("binary",)
    task = Task("click", "binary", metrics=("precision", "accuracy"))
    tracker = TaskMetrics([task])
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0, 1.0])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    tracker.update({"click": logits}, {"click": y}, {})
    out = tracker.compute()["click"]
    # predicted positive: rows 0, 2, 3, 5; of which rows 0 and 3 are positive
    assert out["precision"] == pytest.approx(2 / 4)
    assert out["precision"] == pytest.approx(float(BinaryPrecision()(torch.sigmoid(logits), y.long())))


def test_register_metric_decorator_with_the_task(scratch_registries):
    from torchmetrics.classification import MulticlassAccuracy

    @register_metric("top2", higher_is_better=True, kinds="multiclass")
    def top2(task):
        return MulticlassAccuracy(num_classes=task.num_classes, top_k=2, average="micro")

    task = Task("digit", "multiclass", num_classes=3, metrics=("top2",))
    tracker = TaskMetrics([task])
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 3.0], [3.0, 0.0, 2.0]])
    tracker.update({"digit": logits}, {"digit": torch.tensor([1, 0, 2])}, {})
    assert tracker.compute()["digit"]["top2"] == pytest.approx(2 / 3)  # row 1's class 0 is its lowest logit


def test_register_metric_errors(scratch_registries):
    with pytest.raises(InvalidParameterError, match=r"unknown metric 'precison'.*register_metric"):
        TaskMetrics([Task("b", "binary", metrics=("precison",))])
    with pytest.raises(InvalidParameterError, match="'loss' is the name of every task's mean loss"):
        register_metric("loss", BinaryPrecision, higher_is_better=False, kinds="binary")
    with pytest.raises(InvalidParameterError, match="registered already"):
        register_metric("accuracy", BinaryPrecision, higher_is_better=True, kinds="binary")
    with pytest.raises(InvalidParameterError, match="Did you mean 'binary'"):
        register_metric("p", BinaryPrecision, higher_is_better=True, kinds=("binray",))
    with pytest.raises(InvalidParameterError, match="higher_is_better"):
        register_metric("p", BinaryPrecision, higher_is_better="yes", kinds="binary")
    register_metric("precision", BinaryPrecision, higher_is_better=True, kinds=("binary",))
    with pytest.raises(InvalidParameterError, match="metric 'precision' does not apply to regression task 'r'"):
        TaskMetrics([Task("r", "regression", metrics=("precision",))])
    register_metric("broken", lambda task: 3, higher_is_better=True, kinds="binary")
    with pytest.raises(InvalidParameterError, match="metric 'broken' built int for task 'b'; expected a torchmetrics.Metric"):
        TaskMetrics([Task("b", "binary", metrics=("broken",))])


# ---------------------------------------------------------------------- num_classes inference
def test_infer_num_classes_from_tensors(caplog):
    with caplog.at_level(logging.INFO, logger="polytask"):
        assert infer_num_classes("x", torch.tensor([0, 4, 1, 2, 3, 3])) == 5
    assert caplog.records[-1].levelno == logging.INFO
    assert caplog.records[-1].getMessage() == "task 'x': num_classes inferred as 5 from the training labels (0..4)"
    assert infer_num_classes("x", torch.tensor([0.0, 2.0, float("nan"), 1.0])) == 3  # NaN: missing
    assert infer_num_classes("x", np.array([1, 0])) == 2
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="polytask"):
        assert infer_num_classes("x", [1, 2, 3]) == 4
    assert caplog.records[-1].levelno == logging.WARNING
    assert "class(es) 0 never occur; the labels look 1-based" in caplog.records[-1].getMessage()
    with caplog.at_level(logging.INFO, logger="polytask"):
        assert infer_num_classes("x", torch.tensor([0, 5])) == 6
    assert "class(es) 1, 2, 3, 4 never occur" in caplog.records[-1].getMessage()


def test_infer_num_classes_from_text_labels(caplog):
    with caplog.at_level(logging.INFO, logger="polytask"):
        assert infer_num_classes("animal", pd.Series(["dog", "cat", None, "fox", "cat"])) == 3
    assert caplog.records[-1].getMessage() == "task 'animal': num_classes inferred as 3 from the training labels ('cat', 'dog', 'fox')"
    assert infer_num_classes("animal", ["b", "a"]) == 2


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0, 0]), "every label is 0 \\(one class\\)"),
    (["only"], "every label is 'only'"),
    (torch.tensor([0.0, 1.5]), "label 1.5 is not a class code"),
    (torch.tensor([-1, 1]), "label -1 is not a class code"),
    (torch.tensor([float("nan")]), "there are none"),
])
def test_infer_num_classes_errors(labels, match):
    with pytest.raises(DataError, match=f"task 'x': cannot infer num_classes from the training labels: {match}"):
        infer_num_classes("x", labels)


def test_infer_num_classes_from_a_table_column_matches_its_vocabulary(caplog):
    frame = pd.DataFrame({"f": [0.1, 0.2, 0.3, 0.4, 0.5], "animal": ["dog", "cat", None, "fox", "cat"],
                          "code": [0, 2, 1, np.nan, 2]})
    with caplog.at_level(logging.INFO, logger="polytask"):
        classes = infer_classes_from_column(frame, "animal", "animal")
    assert classes == 3
    assert "num_classes inferred as 3 from the training labels in column 'animal' ('cat', 'dog', 'fox')" in caplog.text
    task = Task("animal", "multiclass", num_classes=classes)
    vocabulary = label_vocabulary(frame, task, "animal")
    assert vocabulary == ["cat", "dog", "fox"] and infer_num_classes("animal", vocabulary) == classes
    prep = TabularPreprocessor.fit(frame, ["f"])
    data = table_dataset(frame, [task], {"animal": "animal"}, prep, {"animal": vocabulary}, {"animal": True}, "train")
    assert data.targets["animal"].max() < classes
    assert infer_classes_from_column(frame, "code", "code") == 3
    with pytest.raises(DataError, match="target column 'anmial' of task 'animal' not found. Did you mean 'animal'"):
        infer_classes_from_column(frame, "animal", "anmial")


def test_task_without_num_classes_points_to_inference():
    with pytest.raises(InvalidParameterError, match=r"infer_num_classes\('digit', y_train\)"):
        Task("digit", "multiclass")
