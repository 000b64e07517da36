"""The ResNet encoder: torchvision's ResNet-18/34 parameter counts, any image size, training, YAML."""

from __future__ import annotations

import pytest
import torch

import polytask as pt
from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.models.encoders import ENCODERS, ResNet


@pytest.mark.parametrize(("blocks", "count"), [((2, 2, 2, 2), 11_689_512), ((3, 4, 6, 3), 21_797_672)])
def test_imagenet_configuration_has_torchvisions_parameter_count(blocks, count):
    """torchvision.models.resnet18 / resnet34 (1000 classes): 11 689 512 / 21 797 672 parameters."""
    net = ResNet(in_channels=3, channels=(64, 128, 256, 512), blocks=blocks, stem="imagenet", out_features=1000)
    assert sum(p.numel() for p in net.parameters()) == count


def test_any_image_size_and_grayscale():
    torch.manual_seed(0)
    net = ENCODERS.create("resnet", in_channels=1, out_features=32)
    for size in (8, 28, 33):
        assert net(torch.randn(2, 1, size, size)).shape == (2, 32)
    assert net(torch.randn(2, 28, 28)).shape == (2, 32)  # (B, H, W) grayscale
    with pytest.raises(ShapeError, match=r"`resnet` expects images \(batch, 1, H, W\); found \(2, 3, 8, 8\)"):
        net(torch.randn(2, 3, 8, 8))
    staged = torch.randn(2, 1, 12, 12)
    net.eval()
    out = staged
    for stage in net.stages():
        out = stage(out)
    torch.testing.assert_close(out, net(staged))


@pytest.mark.parametrize(("params", "message"), [
    ({"blocks": (2, 2)}, "`blocks` of `resnet` needs one count per stage"),
    ({"stem": "cifar"}, "`stem` of `resnet` must be one of small, imagenet"),
    ({"channels": 16}, "`channels` of `resnet` must be a list of positive ints"),
    ({"in_channels": 0}, "`in_channels` of `resnet` must be a positive int"),
])
def test_bad_parameters(params, message):
    with pytest.raises(InvalidParameterError, match=message):
        ResNet(**params)


def test_trains_two_image_tasks_with_a_gradient_method():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 10, 10, generator=gen)
    data = pt.data.MultiOutputDataset(x, {"bright": x.mean(dim=(1, 2, 3)), "left": (x[:, 0, :, :5].mean((1, 2)) > 0).float()})
    tasks = [pt.Task("bright", kind="regression"), pt.Task("left", kind="binary")]
    torch.manual_seed(0)
    model = pt.models.HardSharing(ResNet(in_channels=1, channels=(8, 16), blocks=(1, 1), out_features=16), tasks)
    trainer = pt.Trainer(model, tasks, method="upgrad", loop={"epochs": 4, "batch_size": 16}, optim={"lr": 3e-3},
                         run={"progress": False})
    report = trainer.fit(data, data)
    losses = [r["value"] for r in report.history if r["task"] == "bright" and r["split"] == "train" and r["metric"] == "loss"]
    assert losses[-1] < losses[0]
