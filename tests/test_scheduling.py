"""Task schedulers (which tasks train each step) and loader modes (how an epoch walks task data sets)."""

import csv
import io
import random

import pytest
import torch

import polytask as pt
from polytask import ConfigError, InvalidParameterError
from polytask.config.build import check_registries, trainer_kwargs
from polytask.config.schema import load_config
from polytask.data import SAMPLERS, MultiOutputDataset, TaskDatasets
from polytask.data.loader import LOADER_MODES, epoch_batches, steps_in_epoch
from polytask.methods.equal import Equal
from polytask.scheduling import TASK_SCHEDULERS
from polytask.train.callbacks import CSVLogger
from sections import interrupting, sectioned

TASKS = ("a", "b", "c", "d")
PARAMS = {"all": {}, "random_subset": {"k": 2}, "round_robin": {"k": 1}, "bandit": {"k": 2}, "loss_priority": {"k": 2}, "affinity": {}}


def make(name: str, tasks=TASKS, **params):
    scheduler = TASK_SCHEDULERS.create(name, **{**PARAMS[name], **params})
    scheduler.setup(tasks)
    return scheduler


def drive(scheduler, generator, steps: range, available=TASKS, seed: int = 0) -> list[list[str]]:
    """Select, then feed back synthetic losses (each task's loss decays at its own rate)."""
    rng = random.Random(seed * 10_007 + steps.start)
    chosen = []
    for step in steps:
        active = scheduler.select(step, list(available), generator)
        chosen.append(active)
        scheduler.observe(step, {t: (1 + TASKS.index(t)) * 0.995 ** step * (1 + 0.05 * rng.gauss(0, 1)) for t in active})
    return chosen


def roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_every_registered_scheduler_is_covered():
    assert set(TASK_SCHEDULERS.names()) == set(PARAMS)


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_choice_is_reproducible_under_a_seed_and_never_empty(name):
    runs = [drive(make(name), torch.Generator().manual_seed(seed), range(300)) for seed in (0, 0, 1)]
    assert runs[0] == runs[1]
    if name in ("random_subset", "bandit", "loss_priority"):
        assert runs[0] != runs[2]
    rng = random.Random(0)
    scheduler, gen = make(name), torch.Generator().manual_seed(0)
    for step in range(300):
        available = rng.sample(TASKS, rng.randint(1, 4))
        active = scheduler.select(step, available, gen)
        assert 1 <= len(active) and set(active) <= set(available) and len(set(active)) == len(active)
        scheduler.observe(step, {t: 1.0 / (step + 1) for t in active})


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_state_round_trip_resumes_the_same_choices(name):
    scheduler, gen = make(name), torch.Generator().manual_seed(4)
    drive(scheduler, gen, range(150))
    state, gen_state = roundtrip(scheduler.state_dict()), gen.get_state()
    tail = drive(scheduler, gen, range(150, 300))
    resumed, resumed_gen = make(name), torch.Generator()
    resumed.load_state_dict(state)
    resumed_gen.set_state(gen_state)
    assert drive(resumed, resumed_gen, range(150, 300)) == tail


def test_random_subset_size_and_uniform_inclusion():
    scheduler, gen = make("random_subset", k=2), torch.Generator().manual_seed(0)
    counts = dict.fromkeys(TASKS, 0)
    for step in range(2000):
        active = scheduler.select(step, list(TASKS), gen)
        assert len(active) == 2 and active == sorted(active, key=TASKS.index)
        for t in active:
            counts[t] += 1
    assert all(abs(c / 2000 - 0.5) < 0.05 for c in counts.values()), counts
    assert make("random_subset", k=9).select(0, ["b", "c"], gen) == ["b", "c"]


def test_round_robin_order():
    one, gen = make("round_robin", k=1), torch.Generator()
    assert [one.select(s, list(TASKS), gen) for s in range(6)] == [["a"], ["b"], ["c"], ["d"], ["a"], ["b"]]
    two = make("round_robin", k=2)
    assert [two.select(s, list(TASKS), gen) for s in range(3)] == [["a", "b"], ["c", "d"], ["a", "b"]]
    skip = make("round_robin", k=1)
    assert [skip.select(s, ["a", "c"], gen) for s in range(3)] == [["a"], ["c"], ["a"]]
    assert skip.state_dict() == {"position": 1}


def synthetic_stream(scheduler, steps: int = 1500, noise: float = 0.05, seed: int = 0) -> dict[str, int]:
    """Task 'improving' loses 1% of its loss each time it is trained; 'converged' stays flat."""
    gen, rng = torch.Generator().manual_seed(seed), random.Random(seed)
    trained = {"improving": 0, "converged": 0}
    for step in range(steps):
        (task,) = scheduler.select(step, ["improving", "converged"], gen)
        level = 2.0 * 0.99 ** trained[task] if task == "improving" else 0.5
        trained[task] += 1
        scheduler.observe(step, {task: level * (1 + noise * rng.gauss(0, 1))})
    return trained


@pytest.mark.parametrize("params", [{}, {"rescale": False, "lr": 1.0}, {"decay": 1.0}])
def test_bandit_prefers_a_task_whose_loss_still_falls(params):
    for seed in (0, 1):
        bandit = TASK_SCHEDULERS.create("bandit", **params)
        bandit.setup(["improving", "converged"])
        trained = synthetic_stream(bandit, seed=seed)
        assert trained["improving"] > 2.5 * trained["converged"], (params, trained)
        p = bandit.probabilities(["improving", "converged"])
        assert p[0] > 0.75 and p[1] >= bandit.gamma / 2  # exploration keeps the converged task alive
    # with rewards switched off it stays uniform: the preference comes from the loss stream
    flat = TASK_SCHEDULERS.create("bandit")
    flat.setup(["improving", "converged"])
    for step in range(200):
        flat.select(step, ["improving", "converged"], torch.Generator().manual_seed(step))
        flat.observe(step, {"improving": 1.0, "converged": 1.0})
    assert flat.probabilities(["improving", "converged"]).tolist() == pytest.approx([0.5, 0.5])


def test_bandit_reward_is_relative_decrease_over_its_window():
    bandit = TASK_SCHEDULERS.create("bandit", window=4, rescale=False)
    bandit.setup(["a"])
    assert bandit.progress([4.0, 4.0, 3.0, 3.0]) == pytest.approx(0.25)
    assert bandit.reward(bandit.progress([1.0, 1.0, 2.0, 2.0])) == 0.0  # a rising loss: clipped to 0
    assert bandit.reward(3.0) == 1.0


def test_loss_priority_trains_the_slower_task_more_often():
    prioritiser = TASK_SCHEDULERS.create("loss_priority", beta=2.0)
    prioritiser.setup(["improving", "converged"])
    trained = synthetic_stream(prioritiser, steps=600)
    assert trained["converged"] > 2 * trained["improving"], trained
    uniform = TASK_SCHEDULERS.create("loss_priority", beta=0.0)
    uniform.setup(["x", "y"])
    uniform.observe(0, {"x": 4.0, "y": 1.0})
    uniform.observe(1, {"x": 0.1, "y": 1.0})
    assert uniform.probabilities(["x", "y"]).tolist() == pytest.approx([0.5, 0.5])
    focused = TASK_SCHEDULERS.create("loss_priority", beta=1.0, smoothing=0.0, exploration=0.0)
    focused.setup(["x", "y", "z"])
    focused.observe(0, {"x": 4.0, "y": 1.0})
    focused.observe(1, {"x": 1.0, "y": 1.0})
    # priorities: x 1/4, y 1, z unobserved → the largest (1)
    assert focused.probabilities(["x", "y", "z"]).tolist() == pytest.approx([1 / 9, 4 / 9, 4 / 9])


@pytest.mark.parametrize("name, params, message", [
    ("random_subset", {"k": 0}, "`k` of `random_subset` task scheduler must be an int >= 1; found 0"),
    ("round_robin", {"k": 1.5}, "`k` of `round_robin` task scheduler must be an int >= 1; found 1.5"),
    ("bandit", {"gamma": 0}, r"`gamma` of `bandit` task scheduler must be in \(0, 1\]; found 0"),
    ("bandit", {"window": 1}, "`window` of `bandit` task scheduler must be an int >= 2; found 1"),
    ("bandit", {"decay": 1.5}, r"`decay` of `bandit` task scheduler must be in \(0, 1\]"),
    ("bandit", {"lr": -1.0}, "`lr` of `bandit` task scheduler must be > 0 or None; found -1.0"),
    ("loss_priority", {"beta": -1}, "`beta` of `loss_priority` task scheduler must be >= 0; found -1"),
    ("loss_priority", {"smoothing": 1.0}, r"`smoothing` of `loss_priority` task scheduler must be in \[0, 1\)"),
    ("bandit", {"gama": 0.1}, "has no parameter 'gama'. Did you mean 'gamma'"),
])
def test_invalid_parameters_are_reported(name, params, message):
    with pytest.raises(InvalidParameterError, match=message):
        TASK_SCHEDULERS.create(name, **params)


# -------------------------------------------------------------------------------- loader modes
SIZES = {"big": 100, "mid": 30, "small": 10}


def task_data(sizes=SIZES, seed: int = 0) -> TaskDatasets:
    g = torch.Generator().manual_seed(seed)
    sets = {}
    for name, n in sizes.items():
        x = torch.randn(n, 4, generator=g)
        sets[name] = MultiOutputDataset(x, {name: x.sum(1)})
    return TaskDatasets(sets)


def walk(data, mode: str, steps_per_epoch=None, batch_size: int = 10) -> list[list[str]]:
    sampler = SAMPLERS.create("proportional")
    sampler.setup(data.sizes)
    return [[b.source for b in batches] for batches in epoch_batches(
        data, batch_size, generator=torch.Generator().manual_seed(0), sampler=sampler,
        sampler_generator=torch.Generator().manual_seed(1), step=0, total_steps=100, mode=mode,
        steps_per_epoch=steps_per_epoch)]


@pytest.mark.parametrize("mode, steps", [("sample", 14), ("max_size_cycle", 10), ("min_size", 1), ("sequential", 14)])
def test_each_loader_mode_steps_per_epoch(mode, steps):
    data = task_data()
    assert steps_in_epoch(data, 10, mode) == steps
    walked = walk(data, mode)
    assert len(walked) == steps
    if mode in ("max_size_cycle", "min_size"):
        assert all(sources == list(SIZES) for sources in walked)  # one batch of every task per step
    elif mode == "sequential":
        assert walked == [["big"]] * 10 + [["mid"]] * 3 + [["small"]]
    else:
        assert all(len(sources) == 1 for sources in walked)
    assert len(walk(data, mode, steps_per_epoch=25)) == 25
    assert steps_in_epoch(data, 10, mode, steps_per_epoch=7) == 7


def test_max_size_cycle_sees_every_row_of_the_largest_set_and_cycles_the_smaller():
    data = task_data()
    sampler = SAMPLERS.create("uniform")
    sampler.setup(data.sizes)
    seen = {t: [] for t in SIZES}
    for batches in epoch_batches(data, 10, generator=torch.Generator().manual_seed(0), sampler=sampler,
                                 sampler_generator=torch.Generator(), step=0, total_steps=10, mode="max_size_cycle"):
        for b in batches:
            seen[b.source].append(b.x)
    big = torch.cat(seen["big"])
    assert len(big) == 100 and len(torch.unique(big, dim=0)) == 100
    assert len(torch.cat(seen["small"])) == 100  # 10 rows, 10 passes


def test_sequential_with_more_steps_wraps_around_and_unknown_mode_is_reported():
    walked = walk(task_data(), "sequential", steps_per_epoch=16)
    assert walked[14:] == [["big"], ["big"]]
    with pytest.raises(InvalidParameterError, match="unknown loader mode 'min_sise'. Did you mean 'min_size'"):
        steps_in_epoch(task_data(), 10, "min_sise")
    assert LOADER_MODES[0] == "sample"


# --------------------------------------------------------------------------- trainer integration
class Recording(Equal):
    """Equal weighting that records which tasks each step's method call saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[str, ...]] = []

    def weights(self, step):
        self.seen.append(step.tasks)
        return super().weights(step)


def multi_output(n: int = 96, seed: int = 0) -> MultiOutputDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return MultiOutputDataset(x, {"a": x[:, 0], "b": x[:, 1] - x[:, 2], "c": x[:, 3] * 2})


def regression_tasks(names) -> list[pt.Task]:
    return [pt.Task(t, kind="regression") for t in names]


def steps(trainer: pt.Trainer) -> list[dict]:
    """The trainer's steps.csv rows: (step, epoch, task, loss, weight) per task that trained."""
    return trainer.callback(CSVLogger).steps


def trainer(tasks, in_features: int, **kwargs) -> pt.Trainer:
    torch.manual_seed(0)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=in_features, hidden=[8]), tasks)
    options = dict(epochs=2, batch_size=16, lr=1e-2, progress=False, seed=5)
    options.update(kwargs)
    return pt.Trainer(model, tasks, **sectioned(**options))


def test_steps_log_and_method_see_only_the_active_tasks(tmp_path):
    tasks = regression_tasks("abc")
    method = Recording()
    run = trainer(tasks, 6, method=method, task_scheduler="random_subset", task_scheduler_params={"k": 1},
                  output_dir=tmp_path / "run")
    run.fit(multi_output(), multi_output(32, seed=1))
    assert run.step_index == 12
    with open(tmp_path / "run" / "steps.csv") as handle:
        rows = list(csv.DictReader(handle))
    by_step = {}
    for row in rows:
        by_step.setdefault(int(row["step"]), []).append(row["task"])
    assert sorted(by_step) == list(range(12)) and all(len(v) == 1 for v in by_step.values())
    assert [tuple(v) for _, v in sorted(by_step.items())] == method.seen
    assert len({v[0] for v in by_step.values()}) > 1
    # the logged choice is reproducible under the seed, and another seed chooses differently
    logged = [(s["step"], s["task"]) for s in run.callback(CSVLogger).steps]
    again = trainer(tasks, 6, task_scheduler="random_subset", task_scheduler_params={"k": 1})
    again.fit(multi_output())
    other = trainer(tasks, 6, task_scheduler="random_subset", task_scheduler_params={"k": 1}, seed=6)
    other.fit(multi_output())
    assert [(s["step"], s["task"]) for s in again.callback(CSVLogger).steps] == logged
    assert [(s["step"], s["task"]) for s in other.callback(CSVLogger).steps] != logged


@pytest.mark.parametrize("mode", ["max_size_cycle", "min_size"])
def test_trainer_steps_hold_every_task_in_zipped_modes(mode):
    data = task_data({"a": 48, "b": 16, "c": 32})
    tasks = regression_tasks("abc")
    run = trainer(tasks, 4, loader_mode=mode)
    run.fit(data)
    per_epoch = {"max_size_cycle": 3, "min_size": 1}[mode]
    assert run.step_index == 2 * per_epoch
    for step in range(run.step_index):
        assert sorted(r["task"] for r in run.callback(CSVLogger).steps if r["step"] == step) == ["a", "b", "c"]


def test_trainer_steps_per_epoch_and_scheduler_in_zipped_mode():
    data = task_data({"a": 48, "b": 16, "c": 32})
    method = Recording()
    run = trainer(regression_tasks("abc"), 4, method=method, loader_mode="max_size_cycle", steps_per_epoch=5,
                  task_scheduler="round_robin", task_scheduler_params={"k": 2})
    run.fit(data)
    assert run.step_index == 10
    expected = [("a", "b"), ("a", "c"), ("b", "c")] * 4  # round robin a,b | c,a | b,c in task order
    assert method.seen == expected[:10]
    assert [tuple(r["task"] for r in run.callback(CSVLogger).steps if r["step"] == s) for s in range(10)] == expected[:10]


def test_resume_continues_sampler_and_scheduler_exactly(tmp_path):
    data = task_data({"a": 64, "b": 32, "c": 16})
    tasks = regression_tasks("abc")
    kwargs = dict(sampler="round_robin", task_scheduler="bandit", loader_mode="sample")
    straight = trainer(tasks, 4, epochs=2, **kwargs)
    straight.fit(data)
    first = trainer(tasks, 4, epochs=1, output_dir=tmp_path / "r", **kwargs)
    first.fit(data)
    resumed = trainer(tasks, 4, epochs=2, output_dir=tmp_path / "r", resume=True, **kwargs)
    resumed.fit(data)
    assert [(s["step"], s["task"]) for s in steps(resumed)] == [(s["step"], s["task"]) for s in steps(straight)]
    assert [s["loss"] for s in steps(resumed)] == pytest.approx([s["loss"] for s in steps(straight)])
    assert resumed.task_scheduler.state_dict() == straight.task_scheduler.state_dict()
    assert [s["task"] for s in resumed.callback(CSVLogger).steps[:6]] == ["a", "b", "c"] * 2  # round robin over the steps


def test_mid_epoch_resume_keeps_sampler_and_scheduler_choices(tmp_path):
    data = task_data({"a": 64, "b": 32, "c": 16})
    tasks = regression_tasks("abc")
    kwargs = dict(sampler="round_robin", task_scheduler="loss_priority", loader_mode="max_size_cycle", epochs=2)
    straight = trainer(tasks, 4, **kwargs)
    straight.fit(data)
    with pytest.raises(KeyboardInterrupt):
        trainer(tasks, 4, method=interrupting(6), output_dir=tmp_path / "r", checkpoint_every=2, **kwargs).fit(data)
    resumed = trainer(tasks, 4, output_dir=tmp_path / "r", resume=True, **kwargs)
    resumed.fit(data)
    assert [(s["step"], s["task"]) for s in steps(resumed)] == [(s["step"], s["task"]) for s in steps(straight)]
    assert [s["loss"] for s in steps(resumed)] == pytest.approx([s["loss"] for s in steps(straight)])
    sample = dict(kwargs, loader_mode="sample", task_scheduler="all")
    straight = trainer(tasks, 4, **sample)
    straight.fit(data)
    with pytest.raises(KeyboardInterrupt):
        trainer(tasks, 4, method=interrupting(13), output_dir=tmp_path / "s", checkpoint_every=4, **sample).fit(data)
    resumed = trainer(tasks, 4, output_dir=tmp_path / "s", resume=True, **sample)
    resumed.fit(data)
    assert [(s["step"], s["task"]) for s in steps(resumed)] == [(s["step"], s["task"]) for s in steps(straight)]


def test_config_passes_scheduler_and_loader_options_to_the_trainer():
    cfg = load_config(raw={"data": {"dataset": "adult"}, "task_scheduler": {"name": "bandit", "gamma": 0.2, "k": 2},
                           "train": {"loader_mode": "max_size_cycle", "steps_per_epoch": 50}})
    check_registries(cfg)
    kwargs = trainer_kwargs(cfg)
    assert kwargs["task_scheduler"] == {"name": "bandit", "gamma": 0.2, "k": 2}
    assert kwargs["loop"].loader_mode == "max_size_cycle" and kwargs["loop"].steps_per_epoch == 50
    default = trainer_kwargs(load_config(raw={"data": {"dataset": "adult"}}))
    assert (default["task_scheduler"], default["loop"].loader_mode, default["loop"].steps_per_epoch) == (
        {"name": "all"}, "sample", None)
    for raw, message in (({"task_scheduler": {"name": "bandti"}}, "unknown task scheduler 'bandti'. Did you mean 'bandit'"),
                         ({"task_scheduler": {"name": "bandit", "gama": 1}}, "Did you mean 'gamma'"),
                         ({"train": {"loader_mode": "max_size_cycel"}}, "Did you mean 'max_size_cycle'")):
        with pytest.raises((InvalidParameterError, ConfigError), match=message):
            check_registries(load_config(raw={"data": {"dataset": "adult"}, **raw}))
