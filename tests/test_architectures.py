"""Shared properties of every registered architecture, and each one's own paper property."""

import pytest
import torch
from torch import nn

import polytask as pt
from polytask.engine.backward import Engine
from polytask.models import ARCHITECTURES
from polytask.models.dselect_k import DSelectGate, smooth_step

NAMES = ARCHITECTURES.names()


def make_tasks(name, n):
    if name == "esmm":
        return [pt.Task(f"t{i}", kind="binary") for i in range(n)]
    kinds = [("regression", None), ("binary", None), ("multiclass", 3)]
    return [pt.Task(f"t{i}", kind=kinds[i % 3][0], num_classes=kinds[i % 3][1]) for i in range(n)]


def build(name, n, seed=0):
    """A small model of architecture ``name`` with ``n`` tasks and an input batch for it."""
    torch.manual_seed(seed)
    tasks = make_tasks(name, n)
    if name == "mtan":
        model = ARCHITECTURES.get(name)(pt.encoders.CNN(in_channels=1, channels=[4, 6], out_features=8), tasks)
        return model, torch.randn(4, 1, 10, 10), tasks
    factory = lambda: pt.encoders.MLP(in_features=6, hidden=[8, 8])  # noqa: E731
    if "encoder_factory" in ARCHITECTURES.parameters(name):
        model = ARCHITECTURES.get(name)(factory, tasks)
    else:
        model = ARCHITECTURES.get(name)(factory(), tasks)
    return model, torch.randn(4, 6), tasks


def losses_of(model, x, tasks, z=None):
    z = model.encode(x) if z is None else z
    out = model.decode(z)
    targets = {t.name: (torch.randint(0, t.num_classes, (len(x),)) if t.kind == "multiclass" else
                        torch.randint(0, 2, (len(x),)).float()) for t in tasks}
    return z, {t.name: t.loss(out[t.name], targets[t.name]) for t in tasks}


def test_registry_has_every_architecture():
    assert set(NAMES) >= {"hard_sharing", "task_branches", "soft_sharing", "cross_stitch", "mmoe", "cgc", "ple",
                          "dselect_k", "mtan", "esmm"}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", range(1, 9))
def test_forward_shapes(name, n):
    model, x, tasks = build(name, n)
    out = model(x)
    assert list(out) == [t.name for t in tasks]
    for t in tasks:
        assert out[t.name].shape == ((4,) if t.out_features == 1 else (4, t.out_features))
        assert torch.isfinite(out[t.name]).all()
    if n > 1:  # a subset of tasks
        assert list(model(x, tasks=[tasks[-1].name])) == [tasks[-1].name]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 3])
def test_shared_private_partition_is_true(name, n):
    model, x, tasks = build(name, n)
    shared = [id(p) for p in model.shared_parameters()]
    private = {t.name: [id(p) for p in model.task_parameters(t.name)] for t in tasks}
    flat = [i for ids in private.values() for i in ids]
    assert len(shared) == len(set(shared)) and len(flat) == len(set(flat))
    assert set(shared).isdisjoint(flat)
    assert set(shared) | set(flat) == {id(p) for p in model.parameters()}
    assert shared, f"{name} declares no shared parameters"
    last = {id(p) for p in model.last_shared_parameters()}
    assert last and last <= set(shared)
    # private really is private: a task's loss never reaches another task's parameters
    _, losses = losses_of(model, x, tasks)
    params = dict((id(p), p) for p in model.parameters())
    for t in tasks:
        others = [params[i] for u in tasks if u.name != t.name for i in private[u.name]]
        if others:
            grads = torch.autograd.grad(losses[t.name], others, retain_graph=True, allow_unused=True)
            assert all(g is None or not g.any() for g in grads), f"{name}: loss of {t.name} reaches other tasks"


@pytest.mark.parametrize("name", NAMES)
def test_engine_compares_on_shared_last_shared_and_features(name):
    model, x, tasks = build(name, 3)
    compares = [("pcgrad", "shared"), ("gradnorm", "last_shared"), ("equal", "auto")]
    if model.shares_representation:  # else each task has its own slice of z: the Trainer refuses features
        compares.append(("mgda", "features"))
    for method, compare in compares:
        model.zero_grad(set_to_none=True)
        engine = Engine(method, model.shared_parameters(), last_shared_params=model.last_shared_parameters(),
                        compare=compare)
        z, losses = losses_of(model, x, tasks)
        assert z.requires_grad
        weights = engine.backward(losses, features=[z], extra_loss=model.extra_loss()).weights
        assert set(weights) == {t.name for t in tasks}
        assert all(torch.isfinite(torch.tensor(w)) for w in weights.values())
        grads = [p.grad for p in model.shared_parameters()]
        assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    model, x, _ = build(name, 3, seed=0)
    other, _, _ = build(name, 3, seed=1)
    model.eval()
    other.eval()
    before = model(x)
    other.load_state_dict(model.state_dict())
    after = other(x)
    for t in before:
        torch.testing.assert_close(before[t], after[t])


def test_soft_sharing_penalty_zero_for_identical_towers_and_grows():
    tasks = make_tasks("soft_sharing", 3)
    base = pt.encoders.MLP(in_features=6, hidden=[8, 8])
    import copy

    for distance in ("pairwise", "mean"):
        model = pt.models.SoftSharing(lambda: copy.deepcopy(base), tasks, strength=0.5, distance=distance)  # noqa: B023
        assert model.penalty().item() == 0.0
        assert model.extra_loss().item() == 0.0
        direction = [torch.randn_like(p) for p in model.towers["t1"].parameters()]
        values = []
        for eps in (0.1, 0.2, 0.4):
            with torch.no_grad():
                for p, b, d in zip(model.towers["t1"].parameters(), base.parameters(), direction, strict=True):
                    p.copy_(b + eps * d)
            values.append(model.penalty().item())
        assert values[0] > 0 and values[1] > values[0] and values[2] > values[1]
        torch.testing.assert_close(values[1] / values[0], 4.0, rtol=1e-4, atol=0)  # quadratic in the distance
    pairwise = pt.models.SoftSharing(lambda: pt.encoders.MLP(in_features=6, hidden=[8]), tasks, distance="pairwise")
    mean = pt.models.SoftSharing(lambda: pt.encoders.MLP(in_features=6, hidden=[8]), tasks, distance="mean")
    mean.load_state_dict(pairwise.state_dict())
    stacked = torch.stack([torch.cat([p.flatten() for p in t.parameters()]) for t in pairwise.towers.values()])
    expected = (stacked - stacked.mean(0)).pow(2).sum()
    torch.testing.assert_close(mean.penalty(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pairwise.penalty(), 3 * expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["mmoe", "dselect_k"])
def test_gate_outputs_sum_to_one(name):
    model, x, _ = build(name, 4)
    for gate in model.gate_weights(x).values():
        assert gate.shape == (4, 4)
        assert (gate >= 0).all()
        torch.testing.assert_close(gate.sum(-1), torch.ones(4))


def test_mmoe_gates_read_the_input_for_flat_experts_else_the_expert_mean():
    tasks = make_tasks("mmoe", 2)
    flat = pt.models.MMoE(lambda: pt.encoders.MLP(in_features=6, hidden=[8]), tasks, num_experts=3)
    assert flat.gates["t0"].in_features == 6
    images = pt.models.MMoE(lambda: pt.encoders.CNN(in_channels=1, channels=[4], out_features=5), tasks, num_experts=3)
    assert images.gates["t0"].in_features == 5
    assert images(torch.randn(2, 1, 8, 8))["t1"].shape == (2,)


def test_dselect_k_smooth_step_and_sparse_selection():
    t = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    torch.testing.assert_close(smooth_step(t, 1.0), torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    gate = DSelectGate(3, num_experts=5, k=2, gamma=1.0)
    with torch.no_grad():  # saturated codes: each selector picks exactly one expert
        gate.codes.weight.zero_()
        gate.codes.bias.copy_(torch.tensor([5.0, -5.0, 5.0, 5.0, 5.0, -5.0]))  # codes 0b101=5→expert 0, 0b011=3
    weights = gate(torch.randn(7, 3))
    torch.testing.assert_close(weights.sum(-1), torch.ones(7))
    assert ((weights > 0).sum(-1) <= 2).all()
    assert (weights[:, [1, 2, 4]] == 0).all()


def test_esmm_predicts_ctcvr_as_product():
    tasks = [pt.Task("click", kind="binary"), pt.Task("conversion", kind="binary")]
    model = pt.models.ESMM(pt.encoders.MLP(in_features=6, hidden=[8]), tasks)
    x = torch.randn(5, 6)
    out = model(x)
    cond = model.conditional_probabilities(x)
    torch.testing.assert_close(torch.sigmoid(out["click"]), cond["click"])
    torch.testing.assert_close(torch.sigmoid(out["conversion"]), cond["click"] * cond["conversion"])
    assert (torch.sigmoid(out["conversion"]) <= torch.sigmoid(out["click"]) + 1e-6).all()
    with pytest.raises(pt.InvalidParameterError, match="binary"):
        pt.models.ESMM(pt.encoders.MLP(in_features=6, hidden=[8]), [pt.Task("r", kind="regression")])


def test_cross_stitch_units_start_near_identity_and_mix():
    tasks = make_tasks("cross_stitch", 2)
    model = pt.models.CrossStitch(lambda: pt.encoders.MLP(in_features=6, hidden=[8, 8]), tasks)
    assert len(model.alphas) == 2
    torch.testing.assert_close(model.alphas[0].data, torch.tensor([[0.9, 0.1], [0.1, 0.9]]))
    single = pt.models.CrossStitch(lambda: pt.encoders.MLP(in_features=6, hidden=[8]), make_tasks("x", 1))
    torch.testing.assert_close(single.alphas[0].data, torch.ones(1, 1))


def test_mtan_needs_cnn_and_factory_checked():
    with pytest.raises(pt.InvalidParameterError, match="cnn"):
        pt.models.MTAN(pt.encoders.MLP(in_features=6), make_tasks("mtan", 2))
    with pytest.raises(pt.InvalidParameterError, match="callable"):
        pt.models.MMoE(pt.encoders.MLP(in_features=6), make_tasks("mmoe", 2))


def test_dense_head_per_pixel():
    head = pt.models.DenseHead(8, 3, hidden_channels=4, output_size=(12, 12))
    assert head(torch.randn(2, 8, 6, 6)).shape == (2, 3, 12, 12)


def test_user_module_in_expert_models():
    class Enc(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(6, 5)
            self.out_features = 5

        def forward(self, x):
            return torch.tanh(self.lin(x))

    for cls in (pt.models.MMoE, pt.models.CrossStitch, pt.models.SoftSharing, pt.models.CGC):
        assert cls(Enc, make_tasks("x", 2))(torch.randn(3, 6))["t1"].shape == (3,)


# ------------------------------------------------------------------------------- from YAML
def _table(path, n=96):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=n), "b": rng.normal(size=n), "c": rng.choice(["x", "y", "z"], n)})
    frame["price"] = frame["a"] * 2 + rng.normal(size=n) * 0.1
    frame["cheap"] = (frame["a"] < 0).astype(int)
    frame["liked"] = ((frame["a"] < 0) & (frame["b"] > 0)).astype(int)
    frame["kind"] = rng.choice(["p", "q", "r"], n)
    frame.to_csv(path, index=False)
    return path


OPTIONS = {"soft_sharing": {"strength": 0.01, "distance": "mean"}, "mmoe": {"num_experts": 3},
           "cgc": {"num_shared_experts": 1}, "ple": {"levels": 2}, "dselect_k": {"num_experts": 3, "k": 2},
           "task_branches": {"branch_depth": 1}, "cross_stitch": {"self_weight": 0.8}}


@pytest.mark.parametrize("name", NAMES)
def test_every_architecture_trains_from_yaml(name, tmp_path):
    import json

    import yaml

    from polytask.cli.main import main

    if name == "mtan":
        cfg = {"data": {"dataset": "multimnist", "options": {"train_size": 64, "val_size": 32, "test_size": 32}},
               "model": {"architecture": "mtan", "encoder": {"name": "cnn", "channels": [4, 8], "out_features": 16}}}
    else:
        tasks = ({"cheap": {"kind": "binary"}, "liked": {"kind": "binary"}} if name == "esmm" else
                 {"price": {"kind": "regression"}, "cheap": {"kind": "binary"},
                  "kind": {"kind": "multiclass", "num_classes": 3}})
        cfg = {"data": {"files": {"train": str(_table(tmp_path / "t.csv"))}, "features": ["a", "b", "c"]},
               "tasks": tasks, "model": {"architecture": name, "encoder": {"name": "mlp", "hidden": [8]},
                                         "options": OPTIONS.get(name, {})}}
    cfg.update(output_dir=str(tmp_path / "run"), method={"name": "equal"},
               train={"epochs": 1, "batch_size": 32}, run={"progress": False})
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert set(summary["tasks"]) == set(cfg.get("tasks") or {"left": 0, "right": 0})
    assert main(["eval", str(tmp_path / "run"), "--split", "val"]) == 0


def test_architecture_option_typo_is_named(tmp_path, capsys):
    import yaml

    from polytask.cli.main import main

    cfg = {"data": {"files": {"train": str(_table(tmp_path / "t.csv"))}, "features": ["a", "b"]},
           "tasks": {"price": {"kind": "regression"}}, "output_dir": str(tmp_path / "run"),
           "model": {"architecture": "mmoe", "options": {"num_expert": 3}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert "did you mean 'num_experts'" in capsys.readouterr().err.lower()


@pytest.mark.parametrize("name", NAMES)
def test_features_comparison_is_refused_where_tasks_have_their_own_representation(name):
    """On experts, cross-stitch columns, soft sharing and MTAN, z is (batch, T, D) and each task
    reads its own slice: the feature Gramian is diagonal, so comparing there sees no conflict."""
    model, x, tasks = build(name, 3)
    z, losses = losses_of(model, x, tasks)
    jz = torch.stack([torch.autograd.grad(losses[t.name], z, retain_graph=True)[0].flatten() for t in tasks])
    off_diagonal = (jz @ jz.T).fill_diagonal_(0).abs().max()
    assert bool(off_diagonal == 0) == (not model.shares_representation), name
    if model.shares_representation:
        pt.Trainer(model, tasks, method="mgda_ub", run={"progress": False})
    else:
        with pytest.raises(pt.InvalidParameterError, match="its own slice of the representation"):
            pt.Trainer(model, tasks, method="mgda_ub", run={"progress": False})
