"""Where the engine compares task gradients (``compare``) and what the task heads receive (``heads``).

- ``heads``: the shared parameters get the same update either way; each task's private parameters
  get wᵢ ∇Lᵢ (``weighted``) or ∇Lᵢ (``unweighted``), whatever ``compare`` is. Loss-weighting
  methods weight the losses themselves: always weighted, and they compare no gradients.
- ``compare`` defaults: a method's class attribute (MGDA-UB: the features, GradNorm and GREAT: the
  last shared layer, others: all of θ); MGDA-UB on θ is MGDA; a method returning a direction on
  parameters cannot compare on the features.
"""

from __future__ import annotations

import pytest
import torch

import polytask as pt
from polytask.core.errors import InvalidParameterError
from polytask.engine import Engine, task_jacobian
from polytask.engine.options import GRADIENT_METHOD_HEADS
from polytask.methods import METHODS

from .helpers import GRADIENT, LOSS, build, flat, flat_grad, hard_sharing, model_losses


@pytest.fixture(autouse=True)
def _threads(one_thread):
    """Tiny tensors: one intra-op thread is faster on a shared machine."""


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(12, 4, generator=gen), 3 * torch.randn(12, 3, generator=gen)


def run(name: str, compare: str, heads: str, diagnose: bool = False):
    """One engine step on a fresh HardSharing model: the model, its tasks and the report."""
    model, tasks = hard_sharing(3)
    engine = Engine(build(name, [t.name for t in tasks]), model.shared_parameters(),
                    last_shared_params=model.last_shared_parameters(), compare=compare, heads=heads)
    z, losses = model_losses(model, tasks, *data())
    report = engine.backward(losses, features=[z], diagnose=diagnose)
    assert report.compare == compare and report.heads == heads
    return model, tasks, report


@pytest.mark.parametrize("compare", ["shared", "last_shared", "features"])
@pytest.mark.parametrize("name", ["upgrad", "mgda", "moco"])
def test_head_gradients_weighted_or_unweighted(name, compare):
    if METHODS.get(name).needs == "jacobian" and compare == "features":
        pytest.skip("a direction on parameters cannot be compared on the features (tested below)")
    weighted, tasks, report_w = run(name, compare, "weighted")
    unweighted, _, report_u = run(name, compare, "unweighted")
    assert report_w.weights == pytest.approx(report_u.weights, rel=1e-6)
    w = torch.tensor([report_w.weights[t.name] for t in tasks])
    assert not torch.allclose(w, torch.ones_like(w))  # the two conventions differ here
    # θ: the same update under both conventions
    torch.testing.assert_close(flat_grad(unweighted.shared_parameters()), flat_grad(weighted.shared_parameters()),
                               rtol=1e-5, atol=1e-7)
    _, losses = model_losses(weighted, tasks, *data())
    if METHODS.get(name).needs != "jacobian":  # a weighting: θ gets Σ wᵢ ∇Lᵢ wherever it compares
        shared = list(weighted.shared_parameters())
        total = torch.autograd.grad(sum(wi * loss for wi, loss in zip(w, losses.values())), shared, retain_graph=True)
        torch.testing.assert_close(flat_grad(shared), flat(total), rtol=1e-5, atol=1e-7)
    # the heads: wᵢ ∇Lᵢ or ∇Lᵢ
    for i, t in enumerate(tasks):
        own = list(weighted.task_parameters(t.name))
        g = flat(torch.autograd.grad(losses[t.name], own, retain_graph=True))
        torch.testing.assert_close(flat_grad(weighted.task_parameters(t.name)), w[i] * g, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(flat_grad(unweighted.task_parameters(t.name)), g, rtol=1e-5, atol=1e-7)


def test_unweighted_heads_with_a_direction_method_on_the_last_layer():
    """MoCo on the last shared layer: that layer gets the direction, the layers below Σ λᵢ ∇Lᵢ, the
    heads ∇Lᵢ."""
    model, tasks, report = run("moco", "last_shared", "unweighted", diagnose=True)  # diagnose: G in the report
    _, losses = model_losses(model, tasks, *data())
    last = model.last_shared_parameters()
    below = [p for p in model.shared_parameters() if all(p is not q for q in last)]
    assert below
    lam = torch.tensor([report.weights[t.name] for t in tasks])
    total = torch.autograd.grad(sum(wi * loss for wi, loss in zip(lam, losses.values())), below, retain_graph=True)
    torch.testing.assert_close(flat_grad(below), flat(total), rtol=1e-5, atol=1e-7)
    j = task_jacobian(list(losses.values()), last)
    torch.testing.assert_close(report.gramian, j @ j.T, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat_grad(last), lam @ j, rtol=1e-5, atol=1e-7)  # first step: Y = J, d = λᵀ J
    for t in tasks:
        g = flat(torch.autograd.grad(losses[t.name], list(model.task_parameters(t.name)), retain_graph=True))
        torch.testing.assert_close(flat_grad(model.task_parameters(t.name)), g, rtol=1e-5, atol=1e-7)


def test_heads_default_to_the_measured_convention_for_gradient_methods():
    model, _ = hard_sharing(2)
    last = model.last_shared_parameters()
    for name in GRADIENT:
        engine = Engine(build(name), model.shared_parameters(), last_shared_params=last)
        declared = METHODS.get(name).heads  # a method whose paper says (GradNorm: weighted)
        assert engine.heads == (declared or GRADIENT_METHOD_HEADS), name
    assert METHODS.get("gradnorm").heads == "weighted"
    for name in LOSS:
        assert Engine(build(name), model.shared_parameters()).heads == "weighted", name
        assert Engine(build(name), model.shared_parameters(), heads="weighted").compare == "none", name


@pytest.mark.parametrize("option", [{"heads": "unweighted"}, {"compare": "shared"}, {"compare": "last_shared"},
                                    {"compare": "features"}])
@pytest.mark.parametrize("name", LOSS)
def test_loss_weighting_methods_refuse_gradient_options(name, option):
    model, _ = hard_sharing(2)
    key = next(iter(option))
    with pytest.raises(InvalidParameterError, match=f"{key}=.*applies to gradient methods; '{name}' weights"):
        Engine(build(name), model.shared_parameters(), last_shared_params=model.last_shared_parameters(), **option)


# --- compare defaults --------------------------------------------------------------------------------


def test_mgda_ub_compares_on_the_features_by_default():
    model, tasks = hard_sharing(3)
    engine = Engine("mgda_ub", model.shared_parameters())
    assert engine.compare == "features"
    z, losses = model_losses(model, tasks, *data())
    report = engine.backward(losses, features=[z])
    assert report.compare == "features" and report.gramian is None and report.feature_gramian is not None
    z, losses = model_losses(model, tasks, *data())
    jz = task_jacobian(list(losses.values()), [z])
    torch.testing.assert_close(report.feature_gramian, jz @ jz.T)


def test_mgda_ub_on_the_shared_parameters_is_mgda_exactly():
    out = []
    for name, compare in (("mgda", "auto"), ("mgda_ub", "shared")):
        model, tasks = hard_sharing(3)
        z, losses = model_losses(model, tasks, *data())
        report = Engine(name, model.shared_parameters(), compare=compare).backward(losses, features=[z])
        out.append((report, [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = out
    assert a.compare == b.compare == "shared" and a.weights == b.weights
    assert torch.equal(a.gramian, b.gramian)
    assert all(torch.equal(x, y) for x, y in zip(grads_a, grads_b, strict=True))


@pytest.mark.parametrize("name", ["gradnorm", "great"])
def test_gradnorm_and_great_compare_on_the_last_shared_layer_by_default(name):
    model, tasks = hard_sharing(3)
    with pytest.raises(InvalidParameterError, match=f"compare='last_shared' \\(the default of '{name}'\\) needs "
                                                    "`last_shared_params`"):
        Engine(name, model.shared_parameters())
    last = model.last_shared_parameters()
    engine = Engine(name, model.shared_parameters(), last_shared_params=last)
    assert engine.compare == "last_shared"
    z, losses = model_losses(model, tasks, *data())
    report = engine.backward(losses, features=[z], diagnose=True)  # G in the report, for GREAT's J too
    z, losses = model_losses(model, tasks, *data())
    j = task_jacobian(list(losses.values()), last)
    assert report.compare == "last_shared"
    torch.testing.assert_close(report.gramian, j @ j.T, rtol=1e-5, atol=1e-7)
    assert Engine(name, model.shared_parameters(), compare="shared").compare == "shared"


@pytest.mark.parametrize("name", [n for n in GRADIENT if METHODS.get(n).needs == "jacobian"])
def test_a_direction_method_cannot_compare_on_the_features(name):
    model, _ = hard_sharing(2)
    with pytest.raises(InvalidParameterError, match=f"'{name}' returns an update direction on parameters"):
        Engine(name, model.shared_parameters(), compare="features")


def test_one_shot_backward_takes_compare_and_heads():
    model, tasks = hard_sharing(3)
    z, losses = model_losses(model, tasks, *data())
    report = pt.backward(losses, model.shared_parameters(), "mgda_ub", features=[z], compare="shared",
                         heads="weighted")
    assert report.compare == "shared" and report.heads == "weighted"
