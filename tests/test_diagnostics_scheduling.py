"""The affinity task scheduler: groups from measured TAG affinity, affinity steps train every task, state, errors."""

from __future__ import annotations

import pytest
import torch

import polytask as pt
from polytask.core.errors import InvalidParameterError
from polytask.data import MultiOutputDataset
from polytask.scheduling import TASK_SCHEDULERS

# a and b lower each other's loss, c raises theirs and they raise c's
Z = [[0.3, 0.2, -0.1],
     [0.25, 0.3, -0.2],
     [-0.15, -0.1, 0.4]]


def _scheduler(**params):
    scheduler = TASK_SCHEDULERS.create("affinity", **params)
    scheduler.setup(["a", "b", "c"])
    return scheduler


def test_steps_cycle_through_the_best_groups_and_affinity_steps_train_every_task():
    scheduler, gen = _scheduler(groups=2), torch.Generator().manual_seed(0)
    assert scheduler.select(1, ["a", "b", "c"], gen) == ["a", "b", "c"]  # nothing measured yet
    scheduler.every = 4
    scheduler.observe_affinity(0, ["a", "b", "c"], Z)
    chosen = [scheduler.select(step, ["a", "b", "c"], gen) for step in range(1, 9)]
    assert chosen == [["a", "b"], ["c"], ["a", "b"], ["a", "b", "c"], ["c"], ["a", "b"], ["c"], ["a", "b", "c"]]
    one = _scheduler(groups=1)
    one.observe_affinity(0, ["a", "b", "c"], Z)
    assert one.select(1, ["a", "b", "c"], gen) == ["a", "b", "c"]
    # a pair never measured together: no split is trusted yet
    partial = _scheduler()
    partial.observe_affinity(0, ["a", "b"], [row[:2] for row in Z[:2]])
    assert partial.select(1, ["a", "b", "c"], gen) == ["a", "b", "c"]
    assert partial.select(2, ["a", "b"], gen) in (["a", "b"], ["a"], ["b"])


def test_smoothing_and_state_roundtrip():
    scheduler = _scheduler(smoothing=0.5)
    scheduler.observe_affinity(0, ["a", "b"], [[0.0, 1.0], [0.0, 0.0]])
    scheduler.observe_affinity(1, ["a", "b"], [[0.0, 0.0], [0.0, 0.0]])
    assert scheduler.affinity["a"]["b"] == pytest.approx(0.5)
    again = _scheduler(smoothing=0.5)
    again.load_state_dict(scheduler.state_dict())
    assert again.affinity == scheduler.affinity and again.measured == 2


@pytest.mark.parametrize(("params", "match"), [({"groups": 0}, "`groups`"), ({"smoothing": 1.0}, "`smoothing`"),
                                               ({"exploration": 2}, "`exploration`")])
def test_bad_parameters_are_refused(params, match):
    with pytest.raises(InvalidParameterError, match=match):
        TASK_SCHEDULERS.create("affinity", **params)


def test_trainer_with_the_affinity_scheduler_and_the_diagnostics_callback_trains_groups(tmp_path):
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="regression"), pt.Task("c", kind="regression")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 4, generator=g)
    data = MultiOutputDataset(x, {"a": x[:, 0], "b": x[:, 0] + 0.1 * x[:, 1], "c": x[:, 2] * x[:, 3]})
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=4, hidden=[16]), tasks)
    trainer = pt.Trainer(model, tasks, method="equal", task_scheduler={"name": "affinity", "groups": 3},
                         loop={"epochs": 2, "batch_size": 16}, optim={"lr": 0.01}, run={"progress": False},
                         callbacks=[{"name": "diagnostics", "affinity_every": 4}], output_dir=tmp_path / "run")
    trainer.fit(data)
    assert trainer.task_scheduler.measured == 8 and trainer.task_scheduler.every == 4
    from polytask.train.callbacks import CSVLogger

    steps = trainer.callback(CSVLogger).steps
    per_step: dict[int, set[str]] = {}
    for row in steps:
        per_step.setdefault(row["step"], set()).add(row["task"])
    assert all(per_step[s] == {"a", "b", "c"} for s in per_step if s % 4 == 0)  # affinity steps
    assert any(len(v) < 3 for v in per_step.values())  # between them, groups train apart


def test_bandit_rewarded_by_validation_progress_favours_the_task_whose_held_out_loss_falls():
    bandit = TASK_SCHEDULERS.create("bandit", k=1, reward="validation", rescale=False, decay=1.0, lr=1.0)
    bandit.setup(["a", "b"])
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(InvalidParameterError, match="needs the diagnostics callback"):
        bandit.select(0, ["a", "b"], gen)
    bandit.fed_by_diagnostics = True
    val = {"a": 1.0, "b": 1.0}
    for epoch in range(5):
        for step in range(20):
            active = bandit.select(step, ["a", "b"], gen)
            bandit.observe(step, {t: 5.0 / (step + 1) for t in active})  # training losses give no reward here
        bandit.observe_validation(epoch, val)
        val = {"a": val["a"] * 0.8, "b": val["b"]}  # only a's held-out loss improves
    p = bandit.probabilities(["a", "b"])
    assert p[0] > 0.7 > p[1]
    again = TASK_SCHEDULERS.create("bandit", k=1, reward="validation")
    again.setup(["a", "b"])
    again.load_state_dict(bandit.state_dict())
    assert again.val_losses == bandit.val_losses and again.log_weights == bandit.log_weights
    with pytest.raises(InvalidParameterError, match="`reward` of `bandit`"):
        TASK_SCHEDULERS.create("bandit", reward="test")


def test_bandit_validation_reward_in_a_run_needs_validation_data(tmp_path):
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="regression")]
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    data = MultiOutputDataset(x, {"a": x[:, 0], "b": x[:, 1]})
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=3, hidden=[8]), tasks)
    trainer = pt.Trainer(model, tasks, task_scheduler={"name": "bandit", "reward": "validation"},
                         loop={"epochs": 2, "batch_size": 16}, run={"progress": False},
                         callbacks=[{"name": "diagnostics", "affinity_every": 0}])
    report = trainer.fit(data, val=data)
    assert report.best_epoch >= 1 and trainer.task_scheduler.val_losses
    bare = pt.Trainer(pt.models.HardSharing(pt.encoders.MLP(in_features=3, hidden=[8]), tasks), tasks,
                      task_scheduler={"name": "bandit", "reward": "validation"}, loop={"epochs": 1, "batch_size": 16},
                      run={"progress": False}, callbacks=[{"name": "diagnostics", "affinity_every": 0}])
    with pytest.raises(InvalidParameterError, match="needs validation data"):
        bare.fit(data)


def test_affinity_scheduler_with_affinity_switched_off_is_refused():
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="regression")]
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=3, hidden=[8]), tasks)
    trainer = pt.Trainer(model, tasks, task_scheduler="affinity", loop={"epochs": 1, "batch_size": 16},
                         run={"progress": False}, callbacks=[{"name": "diagnostics", "affinity_every": 0}])
    with pytest.raises(InvalidParameterError, match="set affinity_every > 0"):
        trainer.fit(MultiOutputDataset(x, {"a": x[:, 0], "b": x[:, 1]}))
