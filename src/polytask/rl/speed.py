"""Speed of multi-task SAC per encoder: ``polytask rl speed`` (or ``python -m polytask.rl.speed``).

Two figures per encoder, both measured in one process so that they compare under the same load:

* loop: environment steps per second of the whole training loop (a lockstep step of every task,
  its storage and one SAC update of actor, critic and α), timed by :class:`RLTrainer` itself
  over ``steps`` steps after a warm-up episode, the encoders' loops taking turns episode by
  episode, evaluation skipped;
* update: the median time of one SAC update (both engines' backward passes included) on the same
  replay buffer, the encoders interleaved repeat by repeat so that a load change hits them all,
  and its ratio to the ``shared_mlp`` update (the issue's goal: CARE ≤ 1.5×).

With ``--method`` other than ``equal``, a second update column times that method's update
against ``equal``'s on the same encoder (the engine's Gramian or Jacobian cost inside RL).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from polytask.rl.buffer import TaskReplayBuffer
from polytask.rl.config import RLLoopOptions, SACOptions
from polytask.rl.sac import MultiTaskSAC
from polytask.rl.trainer import RLTrainer


def _agent(env: Any, encoder: str, method: str, sac: SACOptions, seed: int) -> MultiTaskSAC:
    return MultiTaskSAC(env.task_names, env.obs_dim, env.act_dim, encoder=encoder, sac=sac, method=method, seed=seed)


def measure(*, env: str = "pendulum", encoders: Sequence[str] = ("shared_mlp", "onehot_mlp", "per_task_heads", "care"),
            method: str = "equal", steps: int = 200, repeats: int = 30, threads: int = 1, seed: int = 0,
            env_options: dict[str, Any] | None = None, sac: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per encoder: loop steps/s, median update ms, ratio to shared_mlp (and to equal).

    ``sac``: SAC options to time (default: :class:`SACOptions`' mtrl-sized networks, 3 × 400)."""
    from polytask.rl.envs.registry import make_env

    torch.set_num_threads(threads)
    family = make_env(env, **(env_options or {}))
    length = family.max_episode_steps
    steps = max(length, steps // length * length)
    options = SACOptions(**{**(sac or {}), "random_steps": 0, "update_after": 1, "buffer_size": 10 * length + steps})
    # the loops run one episode each in turn (a load change hits every encoder alike); the first
    # episode of each warms the allocator and kernels up and is not timed
    never = 10**9 * length  # a cadence past the budget: no evaluation, no checkpoint (no run directory anyway)
    loop = RLLoopOptions(steps=length, eval_every=never, eval_episodes=1, checkpoint_every=never, progress=False)
    trainers = {encoder: RLTrainer(family, family, _agent(family, encoder, method, options, seed), loop, seed=seed)
                for encoder in encoders}
    for episode in range(steps // length + 1):
        for trainer in trainers.values():
            trainer.loop = loop.model_copy(update={"steps": (episode + 1) * length})
            trainer.fit()
            if episode == 0:
                trainer.timing = {"seconds": 0.0, "steps": 0}
    rows: list[dict[str, Any]] = []
    for encoder, trainer in trainers.items():
        rows.append({"encoder": encoder, "tasks": family.num_tasks,
                     "loop_steps_per_s": trainer.timing["steps"] / trainer.timing["seconds"], "buffer": trainer.buffer})
    # interleaved update timings on one filled buffer
    buffer: TaskReplayBuffer = rows[0]["buffer"]
    methods = [method] if method == "equal" else [method, "equal"]
    agents = {(e, m): _agent(family, e, m, options, seed) for e in encoders for m in methods}
    generator = torch.Generator().manual_seed(seed)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in agents}
    for r in range(repeats + 3):
        for key, agent in agents.items():
            batch = buffer.sample(options.batch_size, generator)
            start = time.perf_counter()
            agent.update(batch)
            if r >= 3:  # the first updates warm up
                times[key].append(time.perf_counter() - start)
    base = statistics.median(times[("shared_mlp", method)]) if ("shared_mlp", method) in times else None
    for row in rows:
        row.pop("buffer")
        median = statistics.median(times[(row["encoder"], method)])
        row["update_ms"] = 1000 * median
        row["update_vs_shared_mlp"] = median / base if base else float("nan")
        if method != "equal":
            row["update_vs_equal"] = median / statistics.median(times[(row["encoder"], "equal")])
    family.close()
    for row in rows:
        row.update(method=method, threads=threads, load=_load(), hidden=list(options.hidden),
                   batch_size=options.batch_size)
    return rows


def _load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        return "n/a"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    extra = "update_vs_equal" in rows[0]
    head = "| encoder | env steps/s (loop) | update ms (median) | × shared_mlp update |" + (
        f" × equal ({rows[0]['method']}) |" if extra else "")
    lines = [head, "|" + " --- |" * (5 if extra else 4)]
    for r in rows:
        line = (f"| {r['encoder']} | {r['loop_steps_per_s']:.1f} | {r['update_ms']:.2f} | "
                f"{r['update_vs_shared_mlp']:.2f} |")
        lines.append(line + (f" {r['update_vs_equal']:.2f} |" if extra else ""))
    r = rows[0]
    lines.append(f"\n{r['tasks']} tasks, batch {r['batch_size']} per task, trunk {r['hidden']}, method {r['method']}, "
                 f"torch threads {r['threads']}, "
                 f"load average {r['load']} (cpus {os.cpu_count()})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m polytask.rl.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="pendulum")
    parser.add_argument("--encoders", default="shared_mlp,onehot_mlp,per_task_heads,care")
    parser.add_argument("--method", default="equal")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--hidden", default="400,400,400", help="the actor's and critics' trunk widths")
    parser.add_argument("--batch-size", type=int, default=128, help="transitions per task per update")
    args = parser.parse_args(argv)
    print(format_table(measure(env=args.env, encoders=args.encoders.split(","), method=args.method,
                               steps=args.steps, repeats=args.repeats, threads=args.threads,
                               sac=sac_options(args.hidden, args.batch_size))))


def sac_options(hidden: str, batch_size: int) -> dict[str, Any]:
    return {"hidden": [int(w) for w in hidden.split(",") if w.strip()], "batch_size": batch_size}


if __name__ == "__main__":
    main()
