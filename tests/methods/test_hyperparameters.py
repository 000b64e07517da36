"""Hyper-parameter and setup validation of the methods: each bad value is refused with a message
naming the parameter and the method."""

from __future__ import annotations

import pytest

from polytask.core.errors import InvalidParameterError
from polytask.methods import get_method

from .helpers import build


@pytest.mark.parametrize("name,params,match", [
    ("mgda", {"normalization": "l1"}, "`normalization` of `MGDA`"),
    ("gradvac", {"beta": 1.5}, "`beta` of `GradVac`"),
    ("aligned_mtl", {"scale": "max"}, "`scale` of `AlignedMTL`"),
    *[("fairgrad", {"alpha": bad}, "`alpha` of `FairGrad`") for bad in (0, -1.0, float("nan"), "1")],
    ("graddrop", {"leak": 1.5}, r"`leak` of `GradDrop` must be in \[0, 1\]"),
    ("moco", {"beta": 2}, r"`beta` of `MoCo` must be in \(0, 1\]; found 2"),
    ("inverse_size", {"alpha": -1}, "must be >= 0; found -1"),
    ("uncertainty", {"forms": {"a": "ranking"}}, "'regression' or 'classification'"),
    ("dtp", {"kpis": {"a": "mae"}}, "higher-is-better"),
    ("warmup", {"inner": "dwa", "steps": -1}, "must be an int >= 0"),
    ("warmup", {"inner": "dwx", "steps": 1}, "unknown method"),
    ("warmup", {"inner": "moco", "steps": 1}, "cannot be warmed up"),
])
def test_bad_hyper_parameter_is_refused(name, params, match):
    with pytest.raises(InvalidParameterError, match=match):
        get_method(name, **params)


def test_inverse_size_needs_every_task_size():
    with pytest.raises(InvalidParameterError, match="training-set size"):
        get_method("inverse_size").setup(["a", "b"])
    with pytest.raises(InvalidParameterError, match="no training-set size for task"):
        get_method("inverse_size").setup(["a", "b"], sizes={"a": 3})
    with pytest.raises(InvalidParameterError, match="Did you mean 'a'"):
        get_method("inverse_size").setup(["a", "b"], sizes={"a": 3, "b": 4, "aa": 1})


def test_uncertainty_rejects_an_unknown_task():
    with pytest.raises(InvalidParameterError, match="unknown task 'c'"):
        build("uncertainty", ("a", "b"), forms={"c": "regression"})
