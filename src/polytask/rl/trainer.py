"""The multi-task RL loop and its run directory (``polytask rl train``).

Each environment step collects one transition in every task (lockstep), stores it in the
task-keyed replay buffer, then runs ``sac.updates_per_step`` SAC updates, each drawing a
per-task minibatch. Every ``train.eval_every`` steps the deterministic policy (tanh μ) plays
``train.eval_episodes`` episodes per task on a second copy of the family; per-task return and
success rate go to metrics.csv with the window's mean losses, α and engine weights.

Run directory (the contract of ``polytask train``, :class:`polytask.train.rundir.RunDir`):
config.yaml, metrics.csv (step, task, metric, value), training.png, summary.json,
environment.json, checkpoints/last.pt (+ previous.pt).

Exact resume: checkpoints are written only at episode boundaries (every cadence is a multiple
of the episode length), right after the next episode's reset. Each episode's reset seed is a
pure function of (seed, task, episode index), so nothing of the environments is saved; the
networks, optimisers, both engines (their methods' state), the replay buffer's contents and
positions, the generator of buffer draws and random actions, the policy's noise generator, the
metrics rows and the window's accumulators are. A run killed at any moment and resumed with
``--resume`` is bit-identical to one that was never stopped.

Departures:
    An evaluation episode succeeds when the family reports success at any of its steps
    (Meta-World's ``info["success"]`` read over the whole episode). The reported steps per second
    count collection and updates, not evaluation or checkpoints.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from polytask.core.errors import ConfigError, InvalidParameterError, ShapeError
from polytask.rl.buffer import TaskReplayBuffer
from polytask.rl.config import RLConfig, RLLoopOptions
from polytask.rl.envs.base import MultiTaskEnv
from polytask.rl.sac import MultiTaskSAC
from polytask.train.checkpoint import load_latest, save_checkpoint
from polytask.train.rundir import RunDir

METRIC_FIELDS = ("step", "task", "metric", "value")
WINDOW_METRICS = ("critic_loss", "actor_loss", "alpha", "critic_weight", "actor_weight")
CRITIC_METRICS = ("critic_loss", "critic_weight")  # every update; the others on actor updates
_MASK = 0xFFFFFFFFFFFFFFFF


def episode_seed(seed: int, task: int, episode: int, *, evaluation: bool = False) -> int:
    """The reset seed of episode ``episode`` of task ``task``: a SplitMix64 hash of the four
    numbers (training and evaluation episodes draw from different streams), in [0, 2³¹)."""
    x = (seed * 0x9E3779B97F4A7C15 + task * 0xD1B54A32D192ED03 + episode * 0x8CB92BA72F3D8DD7
         + (0xABCDEF1234567 if evaluation else 0) + 1) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return (x ^ (x >> 31)) >> 33


def reset_seeds(seed: int, num_tasks: int, episode: int, *, evaluation: bool = False) -> list[int]:
    return [episode_seed(seed, t, episode, evaluation=evaluation) for t in range(num_tasks)]


def check_env(env: MultiTaskEnv, loop: RLLoopOptions) -> None:
    """The family meets the contract the loop needs; cadences fall on episode boundaries."""
    length = env.max_episode_steps
    if not isinstance(length, int) or length < 1:
        raise InvalidParameterError(f"environment {type(env).__name__}: max_episode_steps must be an int >= 1; "
                                    f"found {length!r}")
    for key in ("steps", "eval_every", "checkpoint_every"):
        value = getattr(loop, key)
        if value % length:
            raise ConfigError(f"train.{key} ({value}) must be a multiple of the episode length of "
                              f"{type(env).__name__} ({length} steps), so that it falls on an episode boundary; "
                              f"use {max(length, value // length * length)} or {(value // length + 1) * length}")


class RLTrainer:
    """Drives collection, updates, evaluation and checkpoints of one run.

    Args:
        env, eval_env: two copies of the same family (training and evaluation).
        agent: the :class:`MultiTaskSAC` to train.
        loop: :class:`RLLoopOptions`.
        seed: of the reset seeds and of the generator of buffer draws and random actions.
        run_dir: where files go (None: nothing is written, no checkpoints).
    """

    def __init__(self, env: MultiTaskEnv, eval_env: MultiTaskEnv, agent: MultiTaskSAC, loop: RLLoopOptions, *,
                 seed: int = 0, run_dir: RunDir | None = None) -> None:
        check_env(env, loop)
        if tuple(env.task_names) != agent.tasks:
            raise InvalidParameterError(f"the agent's tasks {list(agent.tasks)} differ from the environment's "
                                        f"{list(env.task_names)}")
        self.env, self.eval_env, self.agent, self.loop = env, eval_env, agent, loop
        self.seed, self.run_dir = seed, run_dir
        opts = agent.options
        self.buffer = TaskReplayBuffer(env.num_tasks, opts.buffer_size, env.obs_dim, env.act_dim)
        self.generator = torch.Generator().manual_seed(seed)  # buffer draws and the random warm-up actions
        self.step = 0
        self.episode = 0
        self.rows: list[dict[str, Any]] = []
        self.window = self._empty_window()
        self.timing = {"seconds": 0.0, "steps": 0}

    def _empty_window(self) -> dict[str, Any]:
        t = self.env.num_tasks
        return {"updates": 0, "episodes": 0, **{m: [0.0] * t for m in WINDOW_METRICS},
                "actor_updates": 0, "train_return": [0.0] * t}

    # ------------------------------------------------------------------------------ the loop
    def fit(self, *, callback: Callable[[RLTrainer], None] | None = None) -> dict[str, Any]:
        """Train to ``loop.steps`` environment steps (continuing from the loaded state)."""
        env, agent, opts, loop = self.env, self.agent, self.agent.options, self.loop
        T, length = env.num_tasks, env.max_episode_steps
        obs = self._reset(env, reset_seeds(self.seed, T, self.episode))
        episode_return = np.zeros(T)
        bar = tqdm(total=loop.steps, initial=self.step, desc="rl", disable=not loop.progress, dynamic_ncols=True)
        try:
            while self.step < loop.steps:
                started = time.perf_counter()  # the loop's own time: collection and updates, not evaluation
                if self.step < opts.random_steps:
                    action = torch.rand(T, env.act_dim, generator=self.generator) * 2 - 1
                else:
                    action = agent.act(torch.as_tensor(obs))
                result = env.step(action.numpy())
                self._check_step(result, T)
                self.buffer.add(obs, action, result.reward, result.obs, result.terminated)
                episode_return += result.reward
                obs = result.obs
                self.step += 1
                if self.step >= opts.update_after:
                    for _ in range(opts.updates_per_step):
                        self._record(agent.update(self.buffer.sample(opts.batch_size, self.generator)))
                self.timing["seconds"] += time.perf_counter() - started
                self.timing["steps"] += 1
                if self.step % length == 0:
                    self._end_episode(episode_return, result.truncated)
                    episode_return = np.zeros(T)
                    obs = self._reset(env, reset_seeds(self.seed, T, self.episode))
                    if self.step % loop.eval_every == 0:
                        self._evaluate(bar)
                    if self.run_dir is not None and (self.step % loop.checkpoint_every == 0 or self.step == loop.steps):
                        self.save()
                    if callback is not None:
                        callback(self)
                bar.update(1)
        finally:
            bar.close()
        seconds, steps = self.timing["seconds"], self.timing["steps"]
        return self.summary(steps / seconds if seconds > 0 else math.nan)

    def _reset(self, env: MultiTaskEnv, seeds: list[int]) -> np.ndarray:
        obs = np.asarray(env.reset(seeds), dtype=np.float32)
        if obs.shape != (env.num_tasks, env.obs_dim):
            raise ShapeError(f"environment {type(env).__name__}: reset returned observations of shape {obs.shape}; "
                             f"expected (T={env.num_tasks}, obs_dim={env.obs_dim})")
        return obs

    def _check_step(self, result: Any, T: int) -> None:
        if result.obs.shape != (T, self.env.obs_dim) or result.reward.shape != (T,):
            raise ShapeError(f"environment {type(self.env).__name__}: step returned obs {result.obs.shape} and reward "
                             f"{result.reward.shape}; expected ({T}, {self.env.obs_dim}) and ({T},)")

    def _end_episode(self, episode_return: np.ndarray, truncated: np.ndarray) -> None:
        if not bool(np.all(truncated)):
            late = [self.env.task_names[i] for i in np.flatnonzero(~np.asarray(truncated, dtype=bool))]
            raise InvalidParameterError(
                f"environment {type(self.env).__name__}: tasks {late} did not truncate at step "
                f"{self.env.max_episode_steps} of their episode; expected fixed-length episodes in every task")
        self.episode += 1
        w = self.window
        w["episodes"] += 1
        w["train_return"] = [a + float(b) for a, b in zip(w["train_return"], episode_return, strict=True)]

    def _record(self, stats: Mapping[str, torch.Tensor]) -> None:
        w = self.window
        w["updates"] += 1
        if "actor_loss" in stats:
            w["actor_updates"] += 1
        for key, values in stats.items():
            w[key] = [a + float(b) for a, b in zip(w[key], values.tolist(), strict=True)]

    # ------------------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Mean return and success rate per task over ``eval_episodes`` deterministic episodes.

        An episode succeeds when the family reports success at any of its steps (Meta-World's
        convention); NaN where the family defines no success.
        """
        env, T = self.eval_env, self.eval_env.num_tasks
        returns, successes = np.zeros(T), np.zeros(T)
        for k in range(self.loop.eval_episodes):
            obs = self._reset(env, reset_seeds(self.seed, T, index * self.loop.eval_episodes + k, evaluation=True))
            total, success = np.zeros(T), np.zeros(T)
            for _ in range(env.max_episode_steps):
                result = env.step(self.agent.act(torch.as_tensor(obs), deterministic=True).numpy())
                total += result.reward
                success = np.fmax(success, result.success) if not np.all(np.isnan(result.success)) else result.success
                obs = result.obs
            returns += total
            successes += success
        n = self.loop.eval_episodes
        return returns / n, successes / n

    def _window_mean(self, key: str) -> list[float] | None:
        """The mean per task of a logged update value over the evaluation window (None: no update)."""
        w = self.window
        count = w["updates"] if key in CRITIC_METRICS else w["actor_updates"]
        return [v / count for v in w[key]] if count else None

    def _evaluate(self, bar: Any) -> None:
        index = self.step // self.loop.eval_every - 1
        returns, successes = self.evaluate(index)
        w, tasks = self.window, self.env.task_names
        rows = []
        for i, task in enumerate(tasks):
            rows.append({"step": self.step, "task": task, "metric": "return", "value": float(returns[i])})
            rows.append({"step": self.step, "task": task, "metric": "success", "value": float(successes[i])})
            if w["episodes"]:
                rows.append({"step": self.step, "task": task, "metric": "train_return",
                             "value": w["train_return"][i] / w["episodes"]})
            for key in WINDOW_METRICS:
                values = self._window_mean(key)
                if values is not None:
                    rows.append({"step": self.step, "task": task, "metric": key, "value": values[i]})
        self.rows.extend(rows)
        critic, actor = self._window_mean("critic_loss"), self._window_mean("actor_loss")
        if critic is not None and actor is not None:
            self.agent.on_epoch_end(index, dict(zip(tasks, critic, strict=True)), dict(zip(tasks, actor, strict=True)))
        self.window = self._empty_window()
        if self.run_dir is not None:
            self.run_dir.write_csv("metrics.csv", METRIC_FIELDS, self.rows)
            plot_rl(self.run_dir.path / "training.png", self.rows, tasks)
        if self.loop.progress:
            shown = "  ".join(f"{t} {r:.1f}" + ("" if math.isnan(s) else f"/{s:.2f}")
                              for t, r, s in zip(tasks, returns, successes, strict=True))
            tqdm.write(f"step {self.step}: return{'/success' if not np.all(np.isnan(successes)) else ''} {shown}")
            bar.set_postfix(mean_return=f"{float(np.mean(returns)):.1f}")

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        agent = self.agent.state_dict()
        return {"model": agent.pop("model"), "agent": agent, "buffer": self.buffer.state_dict(),
                "generator": self.generator.get_state(), "step": self.step, "episode": self.episode,
                "rows": list(self.rows), "window": dict(self.window), "timing": dict(self.timing),
                "tasks": list(self.agent.tasks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if list(state["tasks"]) != list(self.agent.tasks):
            raise InvalidParameterError(f"the checkpoint's tasks {list(state['tasks'])} differ from this run's "
                                        f"{list(self.agent.tasks)}")
        self.agent.load_state_dict({"model": state["model"], **state["agent"]})
        self.buffer.load_state_dict(state["buffer"])
        self.generator.set_state(state["generator"])
        self.step, self.episode = int(state["step"]), int(state["episode"])
        self.rows = [dict(r) for r in state["rows"]]
        self.window = dict(state["window"])
        self.timing = dict(state["timing"])

    def save(self) -> None:
        assert self.run_dir is not None
        save_checkpoint(self.run_dir.last, self.state_dict(), previous=self.run_dir.previous)
        self.run_dir.settle()

    def summary(self, steps_per_second: float) -> dict[str, Any]:
        last = max((r["step"] for r in self.rows), default=None)
        final = {t: {r["metric"]: r["value"] for r in self.rows if r["step"] == last and r["task"] == t}
                 for t in self.env.task_names}
        return {"steps": self.step, "episodes": self.episode, "updates": self.agent.updates,
                "steps_per_second": steps_per_second, "final": final}


def plot_rl(path: Path, rows: Sequence[Mapping[str, Any]], tasks: Sequence[str]) -> None:
    """training.png: evaluation return and success rate, α and the critic engine's weight per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from polytask.train.checkpoint import atomic_write

    panels = (("return", "evaluation return"), ("success", "success rate"), ("alpha", "α (entropy temperature)"),
              ("critic_weight", "critic weight (method)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for task in tasks:
            points = [(r["step"], r["value"]) for r in rows if r["task"] == task and r["metric"] == metric]
            if points and not all(math.isnan(v) for _, v in points):
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", ms=2, label=task)
        ax.set_title(title)
        ax.set_xlabel("environment steps")
        if ax.lines and len(tasks) <= 12:
            ax.legend(fontsize=6)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=80))
    plt.close(fig)


# ------------------------------------------------------------------------------ from a config
def build_env(cfg: RLConfig) -> MultiTaskEnv:
    """The config's environment family, from :mod:`polytask.rl.envs.registry`."""
    from polytask.rl.envs import registry

    return registry.make_env(cfg.env.name, **cfg.env.params)


def load_context(cfg: RLConfig, env: MultiTaskEnv) -> torch.Tensor | None:
    """CARE's task contexts: None (learned), the family's descriptions embedded offline, or a file
    (.json / .npy, :func:`polytask.rl.context.load_context_file`), checked against the encoder's
    ``context_width`` when it gives one."""
    if cfg.context == "learned":
        return None
    from polytask.rl.context import context_embeddings

    width = cfg.encoder.params.get("context_width")
    return context_embeddings(list(env.task_names), env.descriptions,
                              file=None if cfg.context == "descriptions" else cfg.context, width=width)


def build(cfg: RLConfig, *, env: MultiTaskEnv | None = None, eval_env: MultiTaskEnv | None = None,
          run_dir: RunDir | None = None) -> RLTrainer:
    """The trainer of a config (``env``/``eval_env`` given: used instead of the config's family)."""
    env = env if env is not None else build_env(cfg)
    eval_env = eval_env if eval_env is not None else build_env(cfg)
    agent = MultiTaskSAC(env.task_names, env.obs_dim, env.act_dim, encoder=cfg.encoder.model_dump(),
                         context=load_context(cfg, env), sac=cfg.sac, method=cfg.method.model_dump(),
                         engine=cfg.engine, seed=cfg.seed, device=cfg.device)
    return RLTrainer(env, eval_env, agent, cfg.train, seed=cfg.seed, run_dir=run_dir)


def train(cfg: RLConfig, *, resume: bool = False, overwrite: bool = False, env: MultiTaskEnv | None = None,
          eval_env: MultiTaskEnv | None = None) -> dict[str, Any]:
    """Run a config in its output_dir with the run-directory contract; returns summary.json's content."""
    run_dir = RunDir(cfg.output_dir)
    run_dir.check(resume=resume, overwrite=overwrite)
    trainer = build(cfg, env=env, eval_env=eval_env, run_dir=run_dir)  # every config error before a file is written
    run_dir.prepare(resume=resume, overwrite=overwrite)
    try:
        if resume:
            trainer.load_state_dict(load_latest(run_dir.last, run_dir.previous))
        run_dir.write_text("config.yaml", cfg.to_yaml())  # a resumed segment's config (a larger budget)
        run_dir.record_environment(trainer.step)
        summary = trainer.fit()
    except BaseException:
        run_dir.rollback()
        raise
    finally:
        trainer.env.close()
        trainer.eval_env.close()
    run_dir.write_json("summary.json", summary)
    run_dir.commit()
    return summary
