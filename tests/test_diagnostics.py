"""Diagnostics: TAG lookahead affinity, gradient conflict statistics and the exact group search."""

from __future__ import annotations

import copy
import itertools
import json
import math
import random

import pytest
import torch

import polytask as pt
from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.data import MultiOutputDataset
from polytask.diagnostics import (
    AffinityStats,
    ConflictStats,
    OptimizerLookahead,
    best_grouping,
    cosines,
    exhaustive_grouping,
    lookahead_affinity,
    sgd_update,
)


# ------------------------------------------------------------------------------------- affinity
def _quadratic(a: torch.Tensor, b: torch.Tensor):
    """Two convex losses of θ: ‖θ − a‖² and ‖θ − b‖²."""
    def losses_at(params):
        theta = params["theta"]
        return {"a": ((theta - a) ** 2).sum(), "b": ((theta - b) ** 2).sum()}
    return losses_at


def test_self_affinity_after_a_plain_gradient_step_is_positive_for_a_convex_loss():
    theta = torch.tensor([2.0, -1.0, 0.5])
    losses_at = _quadratic(torch.zeros(3), torch.tensor([5.0, 5.0, 5.0]))
    z = lookahead_affinity(losses_at, {"theta": theta}, ["theta"], sgd_update(0.1), ["a", "b"])
    assert z[0, 0] > 0 and z[1, 1] > 0
    # the exact value: θ' = θ − 0.1·2θ = 0.8θ, so L_a(θ')/L_a(θ) = 0.64 and Z_aa = 0.36
    assert z[0, 0].item() == pytest.approx(0.36, abs=1e-6)
    # a step towards a (at 0) moves θ away from b (at 5, 5, 5) on two coordinates: it hurts b here
    la = ((0.8 * theta - 5) ** 2).sum() / ((theta - 5) ** 2).sum()
    assert z[0, 1].item() == pytest.approx(1 - la.item(), abs=1e-6)


def test_two_tasks_with_identical_losses_give_a_symmetric_affinity():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, generator=g)

    def losses_at(params):
        loss = ((x @ params["w"] + params["c"] - y) ** 2).mean()
        return {"a": loss, "b": loss * 1.0}

    params = {"w": torch.randn(4, generator=g), "c": torch.zeros(())}
    z = lookahead_affinity(losses_at, params, ["w"], sgd_update(0.05), ["a", "b"])
    assert torch.allclose(z, z.T, atol=1e-12)
    assert z[0, 1].item() == pytest.approx(z[0, 0].item(), abs=1e-12) and z[0, 0] > 0
    assert params["w"].grad is None  # the given tensors are never written


def test_a_task_without_a_loss_gives_no_row_and_no_column():
    losses_at = _quadratic(torch.zeros(2), torch.ones(2))
    z = lookahead_affinity(lambda p: {**losses_at(p), "c": None}, {"theta": torch.ones(2) * 3}, ["theta"],
                           sgd_update(0.1), ["a", "b", "c"])
    assert torch.isnan(z[2]).all() and torch.isnan(z[:, 2]).all() and torch.isfinite(z[:2, :2]).all()


def test_optimizer_lookahead_is_the_real_optimizer_step_and_leaves_it_untouched():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(layer.parameters(), lr=0.01, weight_decay=0.1)
    for _ in range(3):  # give Adam some moments and a step count
        opt.zero_grad()
        layer(torch.randn(5, 3)).pow(2).sum().backward()
        opt.step()
    named = dict(layer.named_parameters())
    look = OptimizerLookahead(opt, named)
    look.snapshot()
    before = copy.deepcopy(opt.state_dict())
    grads = {n: torch.randn_like(p) for n, p in named.items()}
    stepped = look({n: p.detach() for n, p in named.items()}, grads)
    assert opt.state_dict()["state"][0]["step"] == before["state"][0]["step"]  # the real state is untouched
    for n, p in named.items():  # now the real step with the same gradient
        p.grad = grads[n].clone()
    opt.step()
    for n, p in named.items():
        assert torch.allclose(stepped[n], p.detach(), atol=1e-7)


def test_sgd_update_refuses_a_bad_learning_rate():
    with pytest.raises(InvalidParameterError, match="`lr` of the lookahead step"):
        sgd_update(0)


def test_affinity_stats_average_each_pair_over_the_steps_where_it_is_defined():
    stats = AffinityStats(["a", "b", "c"])
    stats.add(0, ["a", "b"], torch.tensor([[0.2, 0.1], [0.3, 0.4]], dtype=torch.float64))
    stats.add(0, ["a", "c"], torch.tensor([[0.4, math.nan], [0.0, 0.1]], dtype=torch.float64))
    mean = stats.summary()["overall"]["mean"]
    assert mean[0][0] == pytest.approx(0.3) and mean[0][1] == pytest.approx(0.1) and mean[0][2] is None
    assert mean[1][2] is None and mean[2][0] == pytest.approx(0.0)
    with pytest.raises(ShapeError, match="must be 2×2"):
        stats.add(0, ["a", "b"], torch.zeros(3, 3))


# ------------------------------------------------------------------------------------- conflict
def test_cosines_and_conflict_fraction_from_a_gramian_of_known_vectors():
    j = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], dtype=torch.float64)
    g = j @ j.T
    cos = cosines(g)
    assert cos[0, 1].item() == pytest.approx(0.0) and cos[0, 2].item() == pytest.approx(-1 / math.sqrt(2))
    stats = ConflictStats(["a", "b", "c"])
    step = stats.add(0, ["a", "b", "c"], g)
    assert step["norm"]["b"] == pytest.approx(2.0)
    overall = stats.summary()["overall"]
    assert overall["conflict_fraction"] == pytest.approx(2 / 3)  # a~c and b~c are negative, a~b is 0
    mean_norm = (1 + 2 + math.sqrt(2)) / 3
    assert overall["norm_ratio"]["b"] == pytest.approx(2 / mean_norm)


def test_conflict_stats_refuse_a_gramian_of_the_wrong_size_or_unknown_tasks():
    stats = ConflictStats(["a", "b"])
    with pytest.raises(ShapeError, match="2 tasks were named"):
        stats.add(0, ["a", "b"], torch.eye(3))
    with pytest.raises(ShapeError, match="not among the diagnosed tasks"):
        stats.add(0, ["a", "z"], torch.eye(2))


# ------------------------------------------------------------------------------------- grouping
HAND = [  # Z[i][j]: affinity of task i onto task j; a↔b and c↔d help each other, the rest hurt
    [0.0, 0.5, -0.2, -0.3],
    [0.4, 0.0, -0.1, -0.2],
    [-0.3, -0.2, 0.0, 0.6],
    [-0.1, -0.4, 0.2, 0.0],
]
NAMES = ["a", "b", "c", "d"]


def test_grouping_returns_the_known_optimum_of_a_hand_made_matrix():
    two = best_grouping(HAND, NAMES, 2)
    assert two.groups == (("a", "b"), ("c", "d"))
    assert two.total == pytest.approx(0.4 + 0.5 + 0.2 + 0.6)  # s_a = Z_ba, s_b = Z_ab, s_c = Z_dc, s_d = Z_cd
    assert two.task_scores["d"] == pytest.approx(0.6)
    one = best_grouping(HAND, NAMES, 1)
    assert one.groups == (("a", "b", "c", "d"),)
    # s_a = (0.4 − 0.3 − 0.1)/3 = 0, s_b = (0.5 − 0.2 − 0.4)/3, s_c = (−0.2 − 0.1 + 0.2)/3, s_d = (−0.3 − 0.2 + 0.6)/3
    assert one.total == pytest.approx((0.0 - 0.1 - 0.1 + 0.1) / 3)
    three = best_grouping(HAND, NAMES, 3)  # a third group cannot beat the two pairs
    assert three.groups == two.groups


def test_branch_and_bound_matches_the_exhaustive_search_on_random_matrices():
    rng = random.Random(0)
    for t, trial in itertools.product(range(1, 8), range(6)):
        z = [[rng.uniform(-1, 1) for _ in range(t)] for _ in range(t)]
        names = [f"t{i}" for i in range(t)]
        for b in range(1, t + 1):
            fast, slow = best_grouping(z, names, b), exhaustive_grouping(z, names, b)
            assert fast.total == pytest.approx(slow.total, abs=1e-12), (t, trial, b)
            assert len(fast.groups) <= b and sorted(sum(fast.groups, ())) == sorted(names)


@pytest.mark.parametrize(("matrix", "names", "groups", "match"), [
    ([[0, 1], [1, 0], [0, 0]], ["a", "b"], 2, "must be 2×2"),
    ([[0, math.nan], [1, 0]], ["a", "b"], 2, "affinity a → b is nan"),
    ([[0, None], [1, 0]], ["a", "b"], 2, "affinity a → b is None"),
    ([[0, 1], [1, 0]], ["a", "b"], 0, "number of groups must be an int >= 1"),
    ([[0, 1], [1, 0]], ["a", "a"], 1, "distinct"),
    ([[0.0] * 17 for _ in range(17)], [f"t{i}" for i in range(17)], 2, "at most 16 tasks"),
])
def test_grouping_refuses_bad_input(matrix, names, groups, match):
    with pytest.raises((InvalidParameterError, ShapeError), match=match):
        best_grouping(matrix, names, groups)


# ------------------------------------------------------------------------------------- callback
TASKS = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary"), pt.Task("c", kind="regression")]


def _data(n: int = 128) -> MultiOutputDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    return MultiOutputDataset(x, {"a": x[:, 0], "b": (x[:, 1] > 0).float(), "c": -x[:, 0]})


def _train(tmp_path, name, callbacks, method="equal"):
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[16], dropout=0.1), TASKS)
    trainer = pt.Trainer(model, TASKS, method=method, loop={"epochs": 2, "batch_size": 32},
                         optim={"optimizer": "adam", "lr": 0.01}, run={"progress": False}, callbacks=callbacks,
                         output_dir=tmp_path / name, seed=0)
    trainer.fit(_data())
    return trainer


@pytest.mark.slow  # two trainings
def test_diagnostics_callback_writes_conflict_and_affinity_without_changing_training(tmp_path):
    plain = _train(tmp_path, "plain", [], method="mgda")
    diagnosed = _train(tmp_path, "diag", [{"name": "diagnostics", "affinity_every": 2}], method="mgda")
    for p, q in zip(plain.model.parameters(), diagnosed.model.parameters(), strict=True):
        assert torch.equal(p, q)  # lookahead forwards, gradients and updates touch nothing real
    summary = json.loads((tmp_path / "diag" / "diagnostics" / "summary.json").read_text())
    assert summary["conflict"]["overall"]["steps"] == 8 and summary["conflict"]["compare"] == "shared"
    affinity = summary["affinity"]
    assert affinity["overall"]["steps"] == 4 and affinity["every"] == 2
    z = affinity["overall"]["mean"]
    assert all(isinstance(v, float) for row in z for v in row)
    assert z[0][0] > 0 and z[2][2] > 0  # a step on a task lowers its own loss on the same batch
    rows = (tmp_path / "diag" / "diagnostics" / "affinity.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,source,target,value" and len(rows) == 1 + 4 * 9
    from polytask.diagnostics.report import write_report

    page = write_report([tmp_path / "diag"], tmp_path / "r.html").read_text()  # a Trainer run: no config.yaml
    assert 'data-missing="config"' in page and "mean over 4 affinity steps (every 2 steps" in page


def test_diagnostics_callback_gets_a_jacobian_method_s_gramian_every_step(tmp_path):
    """The engine forms a Jacobian method's G only when asked: the callback reads the report's G, so the
    Trainer asks for it every step (conflict statistics on all 8 steps), and not without it."""
    diagnosed = _train(tmp_path, "diag", [{"name": "diagnostics", "affinity_every": 0}], method="graddrop")
    summary = json.loads((tmp_path / "diag" / "diagnostics" / "summary.json").read_text())
    assert summary["conflict"]["overall"]["steps"] == 8
    assert diagnosed._gramian_read
    plain = _train(tmp_path, "plain", [], method="graddrop")
    assert not plain._gramian_read
    for p, q in zip(plain.model.parameters(), diagnosed.model.parameters(), strict=True):
        assert torch.equal(p, q)  # G read or not, the same updates


def test_diagnostics_callback_refuses_bad_parameters():
    from polytask.train.callbacks import CALLBACKS
    with pytest.raises(InvalidParameterError, match="affinity_every"):
        CALLBACKS.create("diagnostics", affinity_every=-1)
    with pytest.raises(InvalidParameterError, match="`conflict`"):
        CALLBACKS.create("diagnostics", conflict="yes")


def test_lookahead_with_sgd_momentum_is_the_papers_update():
    """TAG's lookahead under SGD with momentum μ: θ′ = θ − lr·(μ·buf + g) (PyTorch's convention, dampening 0)."""
    theta = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = torch.optim.SGD([theta], lr=0.1, momentum=0.9)
    theta.grad = torch.tensor([0.5, 0.5])
    opt.step()  # leaves a momentum buffer of [0.5, 0.5]
    look = OptimizerLookahead(opt, {"theta": theta})
    look.snapshot()
    target = torch.tensor([3.0, 1.0])
    losses_at = _quadratic(target, target)
    z = lookahead_affinity(losses_at, {"theta": theta.detach()}, ["theta"], look, ["a", "b"])
    g = 2 * (theta.detach() - target)
    stepped = theta.detach() - 0.1 * (0.9 * torch.tensor([0.5, 0.5]) + g)
    expected = 1 - ((stepped - target) ** 2).sum() / ((theta.detach() - target) ** 2).sum()
    assert z[0, 0].item() == pytest.approx(expected.item(), abs=1e-6)
    assert torch.equal(opt.state[theta]["momentum_buffer"], torch.tensor([0.5, 0.5]))


@pytest.mark.slow  # three short trainings
def test_a_resumed_run_measures_the_same_affinity_as_an_uninterrupted_one(tmp_path):
    def trainer(name, epochs, resume=False):
        torch.manual_seed(0)
        model = pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[16], dropout=0.1), TASKS)
        return pt.Trainer(model, TASKS, method="equal", loop={"epochs": epochs, "batch_size": 32},
                          optim={"optimizer": "adam", "lr": 0.01}, run={"progress": False}, health={"every": 3},
                          callbacks=[{"name": "diagnostics", "affinity_every": 2}], output_dir=tmp_path / name,
                          seed=0, resume=resume)

    trainer("straight", 2).fit(_data())
    trainer("resumed", 1).fit(_data())
    trainer("resumed", 2, resume=True).fit(_data())
    straight, resumed = (json.loads((tmp_path / n / "diagnostics" / "summary.json").read_text()) for n in ("straight", "resumed"))
    assert resumed["affinity"]["overall"]["steps"] == straight["affinity"]["overall"]["steps"] == 4
    for a, b in zip(sum(resumed["affinity"]["overall"]["mean"], []), sum(straight["affinity"]["overall"]["mean"], []),
                    strict=True):
        assert a == pytest.approx(b, abs=1e-9)
    assert resumed["conflict"]["overall"]["steps"] == straight["conflict"]["overall"]["steps"] == 3
    assert (tmp_path / "resumed" / "diagnostics" / "affinity.csv").read_text() == \
        (tmp_path / "straight" / "diagnostics" / "affinity.csv").read_text()
