import pytest
import torch

from polytask import DataError, InvalidParameterError, ShapeError, Task


def test_defaults_per_kind():
    assert Task("r", kind="regression").metric_names == ("rmse", "mae", "r2")
    assert Task("b", kind="binary").main_metric == "accuracy"
    assert Task("m", kind="multiclass", num_classes=4).out_features == 4
    assert Task("l", kind="multilabel", num_classes=3).out_features == 3


@pytest.mark.parametrize("kwargs, match", [
    ({"name": "x", "kind": "regresion"}, "Did you mean 'regression'"),
    ({"name": "x", "kind": "multiclass"}, "num_classes"),
    ({"name": "x", "kind": "binary", "num_classes": 3}, "only for multiclass"),
    ({"name": "x y", "kind": "binary"}, "identifier"),
    ({"name": "x", "kind": "binary", "weight": -1.0}, "weight"),
    ({"name": "x", "kind": "binary", "lr": -1.0}, "lr"),
])
def test_invalid_task(kwargs, match):
    with pytest.raises(InvalidParameterError, match=match):
        Task(**kwargs)


def test_loss_with_mask_is_mean_over_labelled():
    task = Task("r", kind="regression")
    pred, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 0.0, 100.0])
    mask = torch.tensor([True, True, False])
    assert task.loss(pred, y, mask).item() == pytest.approx((1 + 4) / 2)
    assert task.loss(pred, y, torch.zeros(3, dtype=torch.bool)) is None


def test_multiclass_and_binary_losses():
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    ce = Task("m", kind="multiclass", num_classes=3).loss(logits, torch.tensor([0]))
    assert ce.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([0])).item())
    bce = Task("b", kind="binary").loss(torch.tensor([0.0]), torch.tensor([1.0]))
    assert bce.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())


def test_prediction_shape_checked():
    task = Task("m", kind="multiclass", num_classes=3)
    assert task.prepare_prediction(torch.zeros(4, 3)).shape == (4, 3)
    assert Task("b", kind="binary").prepare_prediction(torch.zeros(4, 1)).shape == (4,)
    with pytest.raises(ShapeError, match=r"task 'm'.*\(batch, 3\)"):
        task.prepare_prediction(torch.zeros(4, 2))


@pytest.mark.parametrize("task, y, match", [
    (Task("b", kind="binary"), torch.tensor([0.0, 2.0]), r"\[0, 1\]; found label 2"),
    (Task("m", kind="multiclass", num_classes=3), torch.tensor([0, 3]), r"\[0, 2\]; found label 3"),
    (Task("r", kind="regression"), torch.tensor([0.0, float("nan")]), "NaN at row 1"),
    (Task("m", kind="multiclass", num_classes=3), torch.tensor([0.5, 1.0]), "integer labels"),
    (Task("l", kind="multilabel", num_classes=3), torch.zeros(4, 2), r"\(n, 3\)"),
])
def test_bad_targets(task, y, match):
    with pytest.raises(DataError, match=match):
        task.check_targets(y)


@pytest.mark.parametrize("name", ["type", "train", "forward", "eval"])
def test_task_names_that_are_module_attributes_are_one_clear_error(name):
    """Per-task heads live in nn.ModuleDicts: a task called `type` crashed with a raw KeyError."""
    with pytest.raises(InvalidParameterError, match=f"task name '{name}' is an attribute of torch's nn.Module"):
        Task(name, kind="binary")
