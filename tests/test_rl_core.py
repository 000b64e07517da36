"""Multi-task RL core: CARE's attention, SAC's target / α / Polyak updates on hand cases, the
task-keyed replay buffer, every method through the engines, exact resume (in process and after
SIGKILL), clear errors."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polytask.core.errors import ConfigError, InvalidParameterError, ShapeError
from polytask.methods import METHODS
from polytask.rl.buffer import TaskReplayBuffer
from polytask.rl.config import load_rl_config
from polytask.rl.encoders import CARE, build_encoder
from polytask.rl.sac import MultiTaskSAC, alpha_losses, critic_target, shared_parameters, soft_update, squashed_log_prob
from polytask.rl.trainer import RLTrainer, episode_seed, train
from polytask.train.checkpoint import CheckpointError, load_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from rl_point_mass import PointMass  # noqa: E402

SMALL_SAC = {"hidden": [32, 32], "random_steps": 40, "update_after": 40, "batch_size": 16, "buffer_size": 500}


def small_config(tmp_path: Path, **changes) -> dict:
    raw = {"env": "point_mass", "output_dir": str(tmp_path / "run"), "encoder": "care", "method": "famo",
           "sac": dict(SMALL_SAC), "train": {"steps": 120, "eval_every": 60, "eval_episodes": 1,
                                             "checkpoint_every": 40, "progress": False}}
    raw.update(changes)
    return raw


def trainer_of(raw: dict) -> RLTrainer:
    from polytask.rl.trainer import build

    return build(load_rl_config(raw=raw), env=PointMass(), eval_env=PointMass())


# ------------------------------------------------------------------------------ CARE
@pytest.mark.parametrize("context", [None, torch.randn(3, 7)])
def test_care_attention_weights_sum_to_one_per_task(context):
    encoder = CARE(4, 3, experts=5, context=context)
    weights = encoder.attention_weights()
    assert weights.shape == (3, 5)
    assert torch.all(weights > 0)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    torch.testing.assert_close(encoder.attention_weights([2, 0]), weights[[2, 0]])


def test_care_context_change_changes_only_that_tasks_mixture():
    torch.manual_seed(0)
    context = torch.randn(3, 6)
    encoder = CARE(4, 3, experts=4, context=context)
    obs = torch.randn(3, 5, 4)
    before_w, before_f = encoder.attention_weights(), encoder(obs)
    changed = context.clone()
    changed[1] = torch.randn(6)
    encoder.fixed_context.copy_(changed)
    after_w, after_f = encoder.attention_weights(), encoder(obs)
    assert not torch.allclose(before_w[1], after_w[1])
    torch.testing.assert_close(before_w[[0, 2]], after_w[[0, 2]])
    assert not torch.allclose(before_f[1], after_f[1])
    torch.testing.assert_close(before_f[[0, 2]], after_f[[0, 2]])


def test_care_feature_is_the_mixture_concatenated_with_the_projected_context():
    torch.manual_seed(1)
    encoder = CARE(3, 2, experts=3, hidden=[8], feature_dim=5, context=torch.randn(2, 4), context_dim=6)
    obs = torch.randn(2, 4, 3)
    out = encoder(obs)
    assert out.shape == (2, 4, 11)
    # each expert on its own: the batched evaluation must equal k separate MLPs
    reps = []
    for k in range(3):
        h = torch.relu(obs @ encoder.encoders.weights[0][k] + encoder.encoders.biases[0][k])
        reps.append(torch.relu(h @ encoder.encoders.weights[1][k] + encoder.encoders.biases[1][k]))
    w = encoder.attention_weights()
    mixture = sum(w[:, k, None, None] * reps[k] for k in range(3))
    torch.testing.assert_close(out[..., :5], mixture)
    projected = encoder.context_encoder(encoder.context)
    torch.testing.assert_close(out[..., 5:], projected[:, None, :].expand(-1, 4, -1))


# ------------------------------------------------------------------------------ SAC hand cases
def test_critic_target_hand_case():
    reward = torch.tensor([[1.0, 1.0]])
    terminated = torch.tensor([[0.0, 1.0]])
    q1, q2 = torch.tensor([[2.0, 2.0]]), torch.tensor([[3.0, 3.0]])
    log_prob = torch.tensor([[-0.5, -0.5]])
    y = critic_target(reward, terminated, q1, q2, log_prob, torch.tensor([0.2]), 0.9)
    # 1 + 0.9 · (min(2, 3) − 0.2 · (−0.5)) = 1 + 0.9 · 2.1 = 2.89; a terminal transition keeps r
    torch.testing.assert_close(y, torch.tensor([[2.89, 1.0]]))


def test_per_task_alpha_update_hand_case():
    log_alpha = torch.nn.Parameter(torch.tensor([0.0, math.log(2.0)]))
    log_prob = torch.tensor([[-1.0, -3.0], [0.5, 0.5]])  # task 0 explores more than the target, task 1 less
    losses = alpha_losses(log_alpha, log_prob, target_entropy=-1.0)
    # L_τ = −log α_τ · mean(log π + H̄): task 0 −0·(−3) = 0, task 1 −log 2 · (−0.5)
    torch.testing.assert_close(losses, torch.tensor([0.0, 0.5 * math.log(2.0)]))
    optimizer = torch.optim.SGD([log_alpha], lr=0.1)
    losses.sum().backward()
    optimizer.step()
    # ∂L_τ/∂log α_τ = −mean(log π_τ + H̄): +3 and +0.5, so both α fall, each by its own amount
    torch.testing.assert_close(log_alpha.detach(), torch.tensor([-0.3, math.log(2.0) - 0.05]))


def test_soft_update_hand_case():
    source, target = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
    with torch.no_grad():
        source.weight.fill_(1.0), source.bias.fill_(2.0), target.weight.zero_(), target.bias.zero_()
    soft_update(target, source, 0.1)
    torch.testing.assert_close(target.weight, torch.full((1, 2), 0.1))
    soft_update(target, source, 0.1)  # 0.1 + 0.1 · (1 − 0.1)
    torch.testing.assert_close(target.weight, torch.full((1, 2), 0.19))
    torch.testing.assert_close(target.bias, torch.tensor([0.38]))


def test_squashed_log_prob_matches_torch_distributions():
    mu, log_std = torch.randn(3, 4, 2), torch.randn(3, 4, 2) * 0.5
    noise = torch.randn(3, 4, 2)
    u = mu + log_std.exp() * noise
    reference = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mu, log_std.exp()), [torch.distributions.TanhTransform()])
    expected = reference.log_prob(torch.tanh(u).clamp(-1 + 1e-6, 1 - 1e-6)).sum(-1)
    torch.testing.assert_close(squashed_log_prob(u, noise, log_std), expected, atol=2e-3, rtol=1e-4)


def test_agent_update_moves_target_by_polyak_and_alpha_per_task():
    agent = MultiTaskSAC(["a", "b"], 4, 2, sac={"hidden": [16], "tau": 0.25, "alpha_lr": 0.01})
    buffer = TaskReplayBuffer(2, 50, 4, 2)
    rng = np.random.default_rng(0)
    for _ in range(30):
        buffer.add(rng.normal(size=(2, 4)), rng.uniform(size=(2, 2)), rng.normal(size=2), rng.normal(size=(2, 4)),
                   np.zeros(2))
    before = [p.detach().clone() for p in agent.critic_target.parameters()]
    agent.update(buffer.sample(8, torch.Generator().manual_seed(0)))
    for old, new, source in zip(before, agent.critic_target.parameters(), agent.critic.parameters(), strict=True):
        torch.testing.assert_close(new, 0.75 * old + 0.25 * source.detach())
    # Adam's first step moves each log α_τ by alpha_lr against the sign of its own gradient
    torch.testing.assert_close(agent.log_alpha.detach().abs(), torch.full((2,), 0.01), atol=1e-6, rtol=1e-4)


# ------------------------------------------------------------------------------ buffer
def test_buffer_is_keyed_by_task_and_wraps_around():
    buffer = TaskReplayBuffer(3, 4, 1, 1)
    for step in range(6):
        ids = np.array([[10 * t + step] for t in range(3)], dtype=np.float32)
        buffer.add(ids, ids, ids[:, 0], ids, np.zeros(3))
    assert len(buffer) == 4 and buffer.position.tolist() == [2, 2, 2]
    batch = buffer.sample(64, torch.Generator().manual_seed(3))
    assert batch.obs.shape == (3, 64, 1)
    for t in range(3):
        values = set(batch.obs[t, :, 0].tolist())
        assert values <= {10 * t + s for s in range(2, 6)}  # task t's own, the 4 most recent
        assert len(values) == 4


def test_buffer_state_round_trip_is_exact():
    buffer = TaskReplayBuffer(2, 8, 3, 2)
    rng = np.random.default_rng(1)
    for _ in range(11):
        buffer.add(rng.normal(size=(2, 3)), rng.uniform(size=(2, 2)), rng.normal(size=2), rng.normal(size=(2, 3)),
                   np.zeros(2))
    state = buffer.state_dict()
    copy = TaskReplayBuffer(2, 8, 3, 2)
    copy.load_state_dict(state)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for field in ("obs", "action", "reward", "next_obs", "terminated"):
        assert torch.equal(getattr(buffer.sample(32, g1), field), getattr(copy.sample(32, g2), field))
    step = (np.ones((2, 3)), np.ones((2, 2)), np.ones(2), np.ones((2, 3)), np.ones(2))
    buffer.add(*step), copy.add(*step)  # the positions came back too
    assert torch.equal(buffer.data["obs"], copy.data["obs"])
    with pytest.raises(ShapeError, match=r"`reward` must have shape \(2,\)"):
        buffer.add(np.ones((2, 3)), np.ones((2, 2)), np.ones(3), np.ones((2, 3)), np.ones(2))


# ------------------------------------------------------------------------------ methods
def _compare_for(name: str) -> dict:
    from polytask.methods.base import METHODS as registry

    cls = registry.get(name)
    return {"compare": "shared"} if cls.needs != "losses" and cls.compare == "features" else {}


@pytest.mark.parametrize("name", METHODS.names())
def test_every_registered_method_balances_actor_and_critic(name):
    cls = METHODS.get(name)
    method = {"name": name, **cls.example_params}
    agent = MultiTaskSAC(["a", "b", "c"], 4, 2, encoder="per_task_heads", sac={"hidden": [16]}, method=method,
                         engine=_compare_for(name))
    buffer = TaskReplayBuffer(3, 40, 4, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        buffer.add(rng.normal(size=(3, 4)), rng.uniform(-1, 1, (3, 2)), rng.normal(size=3), rng.normal(size=(3, 4)),
                   np.zeros(3))
    before = [p.detach().clone() for p in shared_parameters(agent.critic)]
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        stats = agent.update(buffer.sample(8, g))
    assert set(stats) == {"critic_loss", "actor_loss", "alpha", "actor_weight", "critic_weight"}
    assert all(torch.isfinite(v).all() for v in stats.values())
    assert agent.critic_engine.index == 2 and agent.actor_engine.index == 2
    assert any(not torch.equal(a, b) for a, b in zip(before, shared_parameters(agent.critic), strict=True))


def test_features_comparison_is_refused_with_a_reason():
    with pytest.raises(InvalidParameterError, match="'mgda_ub' would compare gradients on the features .its default"):
        MultiTaskSAC(["a", "b"], 4, 2, method="mgda_ub", sac={"hidden": [8]})


@pytest.mark.parametrize("method", ["famo", "pcgrad"])
def test_method_state_kept_across_updates_and_resumes_exactly(method):
    raw = {**small_config(Path("/nonexistent")), "method": method}
    reference = trainer_of({**raw, "train": {**raw["train"], "steps": 120}})
    reference.fit()
    first = trainer_of({**raw, "train": {**raw["train"], "steps": 80}})
    first.fit()
    if method == "famo":  # FAMO's logits moved: its state is kept between updates
        state = first.agent.critic_engine.method.state_dict()
        assert any(torch.is_tensor(v) and v.abs().sum() > 0 for v in state.values())
    saved = first.state_dict()
    resumed = trainer_of({**raw, "train": {**raw["train"], "steps": 120}})
    resumed.load_state_dict(saved)
    resumed.fit()
    a, b = reference.state_dict(), resumed.state_dict()
    for net in ("actor", "critic", "critic_target"):
        for key, value in a["model"][net].items():
            assert torch.equal(value, b["model"][net][key]), (net, key)
    for engine in ("actor", "critic"):
        assert a["agent"]["engines"][engine]["index"] == b["agent"]["engines"][engine]["index"]
        for key, value in a["agent"]["engines"][engine]["method"].items():
            if torch.is_tensor(value):
                assert torch.equal(value, b["agent"]["engines"][engine]["method"][key]), key
    assert a["rows"] == b["rows"]


# ------------------------------------------------------------------------------ SIGKILL
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
from rl_point_mass import PointMass
from polytask.rl.config import load_rl_config
from polytask.rl.trainer import train
raw = {raw!r}
train(load_rl_config(raw=raw), resume=sys.argv[1] == "resume", env=PointMass(), eval_env=PointMass())
"""


def _process(tmp_path: Path, name: str, raw: dict, *args: str) -> subprocess.Popen:
    script = tmp_path / f"{name}.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), raw=raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), *(args or ("new",))], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)


def _checkpoint_step(path: Path) -> int | None:
    try:
        return load_checkpoint(path)["step"]
    except CheckpointError:
        return None


def _kill_and_resume(tmp_path: Path, killed: dict) -> None:
    """Start the run in a process, SIGKILL it between checkpoints, then resume it here."""
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    process = _process(tmp_path, "killed", killed, "new")
    start = _checkpoint_step(last)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and _checkpoint_step(last) in (None, start):
        time.sleep(0.02)
    time.sleep(0.3)  # mid-episode, between checkpoints
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    kill = _checkpoint_step(last)
    assert kill is not None and kill < 240, kill
    train(load_rl_config(raw=killed), resume=True, env=PointMass(), eval_env=PointMass())


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    base = small_config(tmp_path, method="famo")
    base["train"] = {"steps": 240, "eval_every": 80, "eval_episodes": 1, "checkpoint_every": 40, "progress": False}
    reference = {**base, "output_dir": str(tmp_path / "reference")}
    killed = {**base, "output_dir": str(tmp_path / "killed")}
    # the uninterrupted reference and the final resume run here (one intra-op thread, as in the
    # killed process): only the killed run needs a process of its own, and a process start costs
    # seconds of imports
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(load_rl_config(raw=reference), env=PointMass(), eval_env=PointMass())
        _kill_and_resume(tmp_path, killed)
    finally:
        torch.set_num_threads(threads)
    a = load_checkpoint(tmp_path / "reference" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 240
    for net in ("actor", "critic", "critic_target"):
        for key, value in a["model"][net].items():
            assert torch.equal(value, b["model"][net][key]), (net, key)
    assert torch.equal(a["model"]["log_alpha"], b["model"]["log_alpha"])
    for field in ("obs", "action", "reward"):
        assert torch.equal(a["buffer"][field], b["buffer"][field]), field
    for key, value in a["agent"]["engines"]["critic"]["method"].items():
        if torch.is_tensor(value):
            assert torch.equal(value, b["agent"]["engines"]["critic"]["method"][key]), key
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "reference" / "metrics.csv"),
                                  pd.read_csv(tmp_path / "killed" / "metrics.csv"))
    assert (tmp_path / "killed" / "training.png").exists() and (tmp_path / "killed" / "summary.json").exists()


# ------------------------------------------------------------------------------ bad input
def test_unknown_encoder_names_the_closest():
    with pytest.raises(InvalidParameterError, match="unknown rl encoder 'caer'. Did you mean 'care'"):
        build_encoder("caer", obs_dim=3, num_tasks=2)
    with pytest.raises(InvalidParameterError, match="rl encoder 'care' has no parameter 'expert'. Did you mean 'experts'"):
        build_encoder("care", obs_dim=3, num_tasks=2, expert=3)


def test_context_of_the_wrong_size_names_expected_and_found():
    with pytest.raises(ShapeError, match=r"context_width=384; found width 768 \(shape \(2, 768\)\)"):
        CARE(3, 2, context=torch.zeros(2, 768), context_width=384)
    with pytest.raises(ShapeError, match=r"one row per task, T=3; found shape \(2, 16\)"):
        CARE(3, 3, context=torch.zeros(2, 16))
    bad = torch.zeros(2, 4)
    bad[1, 2] = float("nan")
    with pytest.raises(ShapeError, match="task row 1 has a non-finite value"):
        CARE(3, 2, context=bad)


def test_unknown_method_and_bad_config(tmp_path):
    with pytest.raises(InvalidParameterError, match="unknown method 'pcgard'. Did you mean 'pcgrad'"):
        MultiTaskSAC(["a"], 3, 1, method="pcgard")
    with pytest.raises(ConfigError, match="unknown key 'sac.gamma'"):
        load_rl_config(raw=small_config(tmp_path, sac={"gamma": 0.9}))
    with pytest.raises(ConfigError, match="env: a multi-task environment family is required"):
        load_rl_config(raw={"encoder": "care"})
    with pytest.raises(ConfigError, match=r"train.checkpoint_every \(30\) must be a multiple of the episode length "
                                          r"of PointMass \(20 steps\)"):
        trainer_of(small_config(tmp_path, train={"steps": 120, "eval_every": 60, "checkpoint_every": 30}))


def test_episode_seeds_are_a_pure_function():
    assert episode_seed(0, 1, 5) == episode_seed(0, 1, 5)
    seeds = {episode_seed(s, t, e, evaluation=v) for s in range(2) for t in range(3) for e in range(4)
             for v in (False, True)}
    assert len(seeds) == 48 and all(0 <= s < 2**31 for s in seeds)


def test_run_directory_contract(tmp_path):
    summary = train(load_rl_config(raw=small_config(tmp_path, encoder="onehot_mlp", method="equal")),
                    env=PointMass(), eval_env=PointMass())
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.csv", "training.png", "summary.json", "environment.json",
                 "checkpoints/last.pt"):
        assert (run / name).exists(), name
    metrics = pd.read_csv(run / "metrics.csv")
    assert list(metrics.columns) == ["step", "task", "metric", "value"]
    seen = set(zip(metrics.task, metrics.metric))
    for task in ("left", "right", "up"):
        for metric in ("return", "success", "critic_loss", "actor_loss", "alpha", "critic_weight", "actor_weight"):
            assert (task, metric) in seen, (task, metric)
    assert sorted(metrics.step.unique()) == [60, 120]
    assert summary["steps"] == 120 and set(summary["final"]) == {"left", "right", "up"}
    with pytest.raises(ConfigError, match="already exists; pass --resume"):
        train(load_rl_config(raw=small_config(tmp_path)), env=PointMass(), eval_env=PointMass())


# ------------------------------------------------------------------------------ real families
EXAMPLES = Path(__file__).parents[1] / "examples"
SMOKE = ["--set", "context=learned", "--set", "sac.hidden=[32,32]", "--set", "sac.batch_size=16",
         "--set", "sac.random_steps=100", "--set", "sac.update_after=100", "--set", "encoder.experts=2",
         "--quiet"]


@pytest.mark.slow
def test_cli_pendulum_smoke_run_and_resume(tmp_path, capsys):
    pytest.importorskip("gymnasium")
    from polytask.cli.main import main

    out = tmp_path / "pendulum"
    args = ["rl", "train", str(EXAMPLES / "rl_pendulum.yaml"), "--set", f"output_dir={out}", *SMOKE,
            "--set", "train={steps: 200, eval_every: 200, eval_episodes: 1, checkpoint_every: 200}"]
    assert main(args) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert sorted(metrics.step.unique()) == [200]
    assert set(metrics.task) == {"pendulum_g10", "pendulum_low_gravity", "pendulum_high_gravity", "pendulum_heavy",
                                 "pendulum_long", "pendulum_short"}
    assert metrics[metrics.metric == "success"].value.between(0, 1).all()
    # updates start at step 300 (fewer updates, the same code): the resumed segment has 100 of them
    longer = [a.replace("steps: 200", "steps: 400").replace("_steps=100", "_steps=300").replace("_after=100", "_after=300")
              for a in args]
    assert main([*longer, "--resume"]) == 0  # a finished run continues to a larger budget
    assert sorted(pd.read_csv(out / "metrics.csv").step.unique()) == [200, 400]
    assert main(args) == 2
    assert "already exists; pass --resume" in capsys.readouterr().err


def test_cli_unknown_environment_is_a_clear_error(tmp_path, capsys):
    from polytask.cli.main import main

    config = tmp_path / "bad.yaml"
    config.write_text("env: pendulm\n")
    assert main(["rl", "train", str(config), "--set", f"output_dir={tmp_path / 'x'}"]) == 2
    assert "unknown environment 'pendulm'. Did you mean 'pendulum'" in capsys.readouterr().err


@pytest.mark.slow  # Meta-World builds MT10 in seconds and its episodes are 500 steps
def test_mt10_smoke_run(tmp_path):
    pytest.importorskip("metaworld")
    from polytask.cli.main import main

    out = tmp_path / "mt10"
    assert main(["rl", "train", str(EXAMPLES / "rl_mt10.yaml"), "--set", f"output_dir={out}", *SMOKE,
                 "--set", "train={steps: 500, eval_every: 500, eval_episodes: 1, checkpoint_every: 500}",
                 # 20 updates, not 400: the smoke run checks that MT10 trains and evaluates end to end
                 # (an episode is 500 steps, so the run cannot be shorter); learning is tested elsewhere
                 "--set", "sac.random_steps=480", "--set", "sac.update_after=480"]) == 0
    metrics = pd.read_csv(out / "metrics.csv")
    assert len(set(metrics.task)) == 10
    assert metrics[metrics.metric == "success"].value.between(0, 1).all()
    assert (out / "checkpoints" / "last.pt").exists()


@pytest.mark.slow  # 3,000 lockstep steps with an update each (about 30 s on 2 loaded cores)
def test_sac_learns_the_point_mass_family(tmp_path):
    """The goals differ per task and are not observed: the task-conditioned agent must reach each."""
    raw = small_config(tmp_path, encoder="onehot_mlp", method="equal",
                       sac={"hidden": [64, 64], "random_steps": 200, "update_after": 200, "batch_size": 64,
                            "buffer_size": 10000, "actor_lr": 1e-3, "critic_lr": 1e-3, "alpha_lr": 1e-3},
                       train={"steps": 3000, "eval_every": 1000, "eval_episodes": 2, "checkpoint_every": 1000,
                              "progress": False})
    summary = train(load_rl_config(raw=raw), env=PointMass(), eval_env=PointMass())
    metrics = pd.read_csv(tmp_path / "run" / "metrics.csv")
    first = metrics[(metrics.step == 1000) & (metrics.metric == "return")].value.mean()
    assert all(v["success"] == 1.0 for v in summary["final"].values()), summary["final"]
    assert np.mean([v["return"] for v in summary["final"].values()]) > first
