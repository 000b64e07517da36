import pytest
import torch

import polytask as pt
from polytask.metrics import METRICS, TaskMetrics, delta_m


def test_delta_m_signs():
    stl = {"a": {"accuracy": 0.80}, "b": {"rmse": 2.0}}
    mtl = {"a": {"accuracy": 0.88}, "b": {"rmse": 2.2}}
    # +10% on a (higher better), -10% on b (lower better) -> 0
    assert delta_m(mtl, stl, {"a": "accuracy", "b": "rmse"}) == pytest.approx(0.0)
    assert delta_m({"a": {"accuracy": 0.84}}, stl, {"a": "accuracy"}) == pytest.approx(5.0)


def test_metric_directions():
    assert METRICS.higher_is_better("accuracy") and not METRICS.higher_is_better("rmse")
    with pytest.raises(pt.InvalidParameterError, match="does not apply"):
        METRICS.build(pt.Task("r", kind="regression", metrics=("accuracy",)))


def test_tracker_respects_masks():
    task = pt.Task("b", kind="binary")
    tracker = TaskMetrics([task])
    out = {"b": torch.tensor([5.0, -5.0, 5.0])}
    tracker.update(out, {"b": torch.tensor([1.0, 0.0, 0.0])}, {"b": torch.tensor([True, True, False])},
                   {"b": torch.tensor(0.5)})
    result = tracker.compute()["b"]
    assert result["accuracy"] == pytest.approx(1.0)
    assert result["loss"] == pytest.approx(0.5)
