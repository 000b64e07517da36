import pytest
import torch
from torch import nn

import polytask as pt
from polytask import InvalidParameterError, ShapeError


def tasks(n=3):
    kinds = [("regression", None), ("binary", None), ("multiclass", 4)]
    return [pt.Task(f"t{i}", kind=kinds[i % 3][0], num_classes=kinds[i % 3][1]) for i in range(n)]


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_hard_sharing_shapes_and_partition(n):
    ts = tasks(n)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 8]), ts, head_hidden=[4])
    out = model(torch.randn(5, 6))
    for t in ts:
        assert out[t.name].shape == ((5,) if t.out_features == 1 else (5, t.out_features))
    shared = {id(p) for p in model.shared_parameters()}
    private = [id(p) for t in ts for p in model.task_parameters(t.name)]
    assert len(private) == len(set(private))
    assert shared.isdisjoint(private)
    assert shared | set(private) == {id(p) for p in model.parameters()}
    last = model.last_shared_parameters()
    assert [p.shape for p in last] == [torch.Size([8, 16]), torch.Size([8])]


def test_cnn_encoder_any_image_size():
    model = pt.models.HardSharing(pt.encoders.CNN(in_channels=1, channels=[4, 8], out_features=16), tasks(2))
    for size in (28, 36):
        assert model(torch.randn(2, 1, size, size))["t0"].shape == (2,)
    with pytest.raises(ShapeError, match="expects images"):
        model(torch.randn(2, 3, 28, 28))


def test_user_encoder_and_heads():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 5)

        def forward(self, x):
            return self.lin(x)

    ts = tasks(2)
    model = pt.models.HardSharing(Enc(), ts, representation_dim=5, heads={"t0": nn.Linear(5, 1)})
    assert model(torch.randn(4, 3))["t1"].shape == (4,)
    with pytest.raises(InvalidParameterError, match="out_features"):
        pt.models.HardSharing(Enc(), ts)
    with pytest.raises(InvalidParameterError, match="unknown task 'tx'"):
        pt.models.HardSharing(Enc(), ts, representation_dim=5, heads={"tx": nn.Linear(5, 1)})


def test_wrong_encoder_output_named():
    model = pt.models.HardSharing(nn.Linear(3, 7), tasks(2), representation_dim=5)
    with pytest.raises(ShapeError, match=r"returned \(4, 7\); expected \(batch, 5\)"):
        model(torch.randn(4, 3))


def test_stems_for_different_inputs():
    ts = tasks(2)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=8, hidden=[8]), ts,
                                  stems={"t0": nn.Linear(3, 8), "t1": nn.Linear(11, 8)})
    assert model(torch.randn(2, 3), task="t0")["t0"].shape == (2,)
    assert model(torch.randn(2, 11), task="t1", tasks=["t1"])["t1"].shape == (2,)
    assert {id(p) for p in model.stems["t1"].parameters()} <= {id(p) for p in model.task_parameters("t1")}
