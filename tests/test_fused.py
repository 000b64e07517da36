"""Encoder `fused`: per-modality encoders on column ranges, concatenation or gated fusion, missing modalities per sample."""

import pytest
import torch

import polytask as pt
from polytask.models.encoders import ENCODERS, Fused

MODALITIES = {"words": {"name": "text", "columns": [0, 6], "vocab_size": 20, "embedding_dim": 8, "out_features": 8,
                        "present": 9},
              "profile": {"name": "mlp", "columns": [6, 9], "hidden": [8], "present": 10}}


def table(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 20, (n, 6), generator=g).float()
    ids[:, 4:] = 0  # padding
    return torch.cat([ids, torch.randn(n, 3, generator=g), torch.ones(n, 2)], 1)  # presence flags: all present


@pytest.mark.parametrize("fusion", ["gated", "concat"])
def test_shapes_and_missing_modality_per_sample(fusion):
    torch.manual_seed(0)
    enc = ENCODERS.create("fused", modalities=MODALITIES, fusion=fusion, out_features=5)
    x = table(4)
    x[1, 9] = 0  # row 1 has no text
    x[2, 10] = 0  # row 2 has no profile
    z = enc(x)
    assert z.shape == (4, 5) and torch.isfinite(z).all()
    # a missing modality is really left out: the text encoder's weights do not reach row 1
    grads = torch.autograd.grad(z[1].sum(), list(enc.encoders["words"].parameters()), allow_unused=True)
    assert all(g is None or not g.any() for g in grads)
    grads = torch.autograd.grad(enc(x)[0].sum(), list(enc.encoders["words"].parameters()), allow_unused=True)
    assert any(g is not None and g.any() for g in grads)


def test_gate_weights_sum_to_one_and_are_zero_on_missing():
    torch.manual_seed(0)
    enc = Fused(modalities=MODALITIES, out_features=5)
    x = table(3)
    x[0, 9] = 0
    g = enc.gate_weights(x)
    torch.testing.assert_close(g.sum(1), torch.ones(3))
    assert g[0, 0] == 0 and g[0, 1] == 1 and (g[1:] > 0).all()
    # with the text missing, z is exactly the profile's representation
    h_profile = enc.projections["profile"](enc.encoders["profile"](x[:, 6:9]))
    torch.testing.assert_close(enc(x)[0], h_profile[0])


def test_trains_in_a_model_with_missing_texts():
    torch.manual_seed(0)
    x = table(256, seed=1)
    y = ((x[:, 0] > 10).float() + (x[:, 6] > 0).float() > 0.5).float()  # needs both modalities
    x[::4, :6], x[::4, 9] = 0, 0
    task = pt.Task("y", kind="binary")
    model = pt.models.HardSharing(Fused(modalities=MODALITIES, out_features=8), [task])
    trainer = pt.Trainer(model, [task], method="equal", loop={"epochs": 15, "batch_size": 32}, optim={"lr": 0.01},
                         run={"progress": False})
    trainer.fit(pt.data.MultiOutputDataset(x, {"y": y}))
    assert trainer.evaluate(pt.data.MultiOutputDataset(x, {"y": y}))["y"]["auroc"] > 0.9


def test_bad_input_named():
    enc = Fused(modalities=MODALITIES)
    x = table(3)
    x[2, 10] = 0.5
    with pytest.raises(pt.DataError, match=r"row 2, presence column 10 of modality 'profile' holds 0.5; expected 1"):
        enc(x)
    x = table(3)
    x[1, 9:] = 0
    with pytest.raises(pt.DataError, match=r"row 1 has none of the modalities \['words', 'profile'\]"):
        enc(x)
    with pytest.raises(pt.ShapeError, match=r"expects a float \(batch, >= 11\)"):
        enc(table(3)[:, :10])
    with pytest.raises(pt.InvalidParameterError, match="`present` of modality 'words'"):
        Fused(modalities={**MODALITIES, "words": {**MODALITIES["words"], "present": 2}})
    with pytest.raises(pt.InvalidParameterError, match="`fusion`"):
        Fused(modalities=MODALITIES, fusion="sum")
    with pytest.raises(pt.InvalidParameterError, match="two or more"):
        Fused(modalities={"words": MODALITIES["words"]})
    with pytest.raises(pt.InvalidParameterError, match="`columns` of modality 'profile'"):
        Fused(modalities={**MODALITIES, "profile": {"name": "mlp", "columns": [9, 6]}})
    with pytest.raises(pt.InvalidParameterError, match="has no parameter 'hiden'"):
        Fused(modalities={**MODALITIES, "profile": {"name": "mlp", "columns": [6, 9], "hiden": [8]}})
    with pytest.raises(pt.InvalidParameterError, match="exists for fusion: gated"):
        Fused(modalities=MODALITIES, fusion="concat").gate_weights(table(2))
