"""AITM (Xi et al., KDD 2021): information transfer along the funnel and the behavioral expectation calibrator."""

import pytest
import torch

import polytask as pt
from polytask.models.aitm import AITM, calibration_penalty

FUNNEL = [pt.Task("click", kind="binary"), pt.Task("cart", kind="binary"), pt.Task("buy", kind="binary")]


def model(weight=0.6, seed=0, tasks=FUNNEL):
    torch.manual_seed(seed)
    return AITM(pt.encoders.MLP(in_features=6, hidden=[16]), tasks, tower_dim=8, head_hidden=[12], calibration_weight=weight)


def funnel_data(n, seed):
    """Nested labels: buy ⊆ cart ⊆ click, each step a harder threshold on the same score."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    score = x[:, 0] + 0.5 * x[:, 1] + 0.3 * torch.randn(n, generator=g)
    return pt.data.MultiOutputDataset(x, {"click": (score > 0).float(), "cart": (score > 0.7).float(),
                                          "buy": (score > 1.3).float()})


def test_shapes_subsets_and_registry():
    assert pt.models.ARCHITECTURES.get("aitm") is AITM
    m = model()
    x = torch.randn(5, 6)
    out = m(x)
    assert list(out) == ["click", "cart", "buy"] and all(v.shape == (5,) for v in out.values())
    m.eval()
    with torch.no_grad():  # a later step alone is the same number as in the full forward
        torch.testing.assert_close(m(x, tasks=["cart"])["cart"], m(x)["cart"])
    mixed = [pt.Task("r", kind="regression"), pt.Task("c", kind="multiclass", num_classes=4)]
    assert model(tasks=mixed)(x)["c"].shape == (5, 4)


def test_attention_weights_sum_to_one():
    weights = model().attention_weights(torch.randn(7, 6))
    assert list(weights) == ["cart", "buy"]  # the first step has nothing transferred to it
    for w in weights.values():
        assert w.shape == (7, 2) and (w > 0).all()
        torch.testing.assert_close(w.sum(-1), torch.ones(7))


def test_information_flows_forward_only():
    m = model()
    out = m(torch.randn(4, 6))
    click_tower = list(m.towers["click"].parameters())
    buy_tower = list(m.towers["buy"].parameters())
    grads = torch.autograd.grad(out["buy"].sum(), click_tower, retain_graph=True)
    assert any(g.abs().sum() > 0 for g in grads), "the click step's tower must reach the buy step through the transfer"
    grads = torch.autograd.grad(out["click"].sum(), buy_tower, allow_unused=True)
    assert all(g is None or not g.any() for g in grads), "a later step must not reach an earlier one"


def test_calibration_penalty_by_hand():
    earlier, later = torch.tensor([0.5, 0.2, 0.9]), torch.tensor([0.3, 0.4, 0.9])
    torch.testing.assert_close(calibration_penalty([earlier, later]), torch.tensor(0.2 / 3))
    assert calibration_penalty([earlier, earlier * 0.5, earlier * 0.1]).item() == 0.0  # ordered: no penalty
    assert calibration_penalty([earlier]).item() == 0.0


def test_extra_loss_zero_when_ordered_positive_otherwise():
    m = model(weight=2.0)
    x = torch.randn(6, 6)
    with torch.no_grad():  # later steps far less likely than earlier ones
        m.heads["cart"].bias.fill_(-30.0)
        m.heads["buy"].bias.fill_(-60.0)
    m(x)
    assert m.extra_loss().item() == 0.0
    assert m.extra_loss() is None  # read once: a stale penalty is never added twice
    with torch.no_grad():  # now the last step is likelier than the one before
        m.heads["buy"].bias.fill_(30.0)
    out = m(x)
    penalty = m.extra_loss()
    expected = 2.0 * (torch.sigmoid(out["buy"]) - torch.sigmoid(out["cart"])).clamp(min=0).mean()
    assert penalty.item() > 0
    torch.testing.assert_close(penalty, expected)
    m.eval()
    m(x)
    assert m.extra_loss() is None  # evaluation adds nothing
    m.train()
    no_penalty = model(weight=0.0)
    no_penalty(x)
    assert no_penalty.extra_loss() is None


def test_calibrator_only_orders_binary_neighbours():
    tasks = [pt.Task("click", kind="binary"), pt.Task("rating", kind="regression"), pt.Task("buy", kind="binary")]
    m = model(tasks=tasks)
    m(torch.randn(3, 6))
    assert m.extra_loss() is None


def test_bad_parameters_named():
    with pytest.raises(pt.InvalidParameterError, match="calibration_weight"):
        model(weight=-1.0)
    with pytest.raises(pt.InvalidParameterError, match="tower_dim"):
        AITM(pt.encoders.MLP(in_features=6, hidden=[8]), FUNNEL, tower_dim=0)
    with pytest.raises(pt.InvalidParameterError, match="segmentation|per-pixel"):
        AITM(pt.encoders.MLP(in_features=6, hidden=[8]), [pt.Task("seg", kind="segmentation", num_classes=3)])


@pytest.mark.slow
def test_trains_with_a_gramian_method_on_features_and_calibrates():
    assert AITM.shares_representation  # every tower reads the encoder's one (batch, D) output
    train, test = funnel_data(768, 0), funnel_data(512, 1)
    violations = {}
    for weight in (0.0, 5.0):
        m = model(weight=weight)
        trainer = pt.Trainer(m, FUNNEL, method="mgda_ub", loop={"epochs": 6, "batch_size": 64},
                             optim={"lr": 0.01}, run={"progress": False})
        assert trainer.engine.compare == "features"
        trainer.fit(train)
        metrics = trainer.evaluate(test)
        assert all(metrics[t]["auroc"] > 0.8 for t in ("click", "cart", "buy")), metrics
        m.eval()
        with torch.no_grad():
            p = {t: torch.sigmoid(v) for t, v in m(test.x).items()}
        violations[weight] = float(calibration_penalty([p["click"], p["cart"], p["buy"]]))
    assert violations[5.0] < 0.1 * violations[0.0], violations  # measured: 6e-6 vs 1.3e-2
