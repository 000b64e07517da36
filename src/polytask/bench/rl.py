"""`polytask bench rl`: encoders of multi-task SAC on the pendulum family, per-task return after a fixed budget.

Arms: a shared MLP (the task is invisible to it), a one-hot-conditioned MLP, CARE (Sodhani, Zhang
& Pineau, ICML 2021: a mixture of encoders weighted by attention from each task's description
embedding) and CARE with PCGrad (Yu et al., NeurIPS 2020) balancing the per-task actor and critic
losses. Each (arm, seed) is a cell: one run of ``polytask.rl.trainer`` for ``steps`` lockstep
environment steps (every task collects one transition per step), then a deterministic
evaluation of ``eval_episodes`` episodes per task (seeds of their own stream). A cell records
each task's mean evaluation return and success rate and the loop's environment steps per second
(collection, updates and the final evaluation). Cells go to a tidy CSV as they finish
(:mod:`polytask.bench.cells`), so a killed benchmark resumes where it stopped.

A reference row: a hand-written controller that knows each task's physics (energy pumping to
swing up, a PD law near the top), to show what return a task allows.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from polytask.bench.cells import Cell, CellKey, append, finished, read
from polytask.core.errors import InvalidParameterError, closest

DATASET = "pendulum"


@dataclass(frozen=True)
class Arm:
    """One row of the comparison: an encoder (with its options), a context source and a method."""

    label: str
    encoder: dict[str, Any]
    method: str = "equal"
    context: str = "learned"


ARMS: dict[str, Arm] = {
    "shared_mlp": Arm("shared_mlp", {"name": "shared_mlp"}),
    "onehot_mlp": Arm("onehot_mlp", {"name": "onehot_mlp"}),
    "care": Arm("care", {"name": "care", "experts": 4}, context="descriptions"),
    "care+pcgrad": Arm("care+pcgrad", {"name": "care", "experts": 4}, method="pcgrad", context="descriptions"),
}


@dataclass(frozen=True)
class Suite:
    name: str
    steps: int
    seeds: int
    tasks: tuple[str, ...] | None  # None: every task of the family
    sac: dict[str, Any]
    eval_episodes: int
    note: str = ""
    arms: tuple[str, ...] = tuple(ARMS)

    def describe(self) -> str:
        sac = ", ".join(f"{k} {v}" for k, v in self.sac.items())
        return (f"{self.steps:,} lockstep environment steps per run ({self.steps // 200} episodes of 200 steps per task), "
                f"SAC with {sac}; final evaluation: {self.eval_episodes} deterministic episodes per task")


SUITES = {
    "full": Suite("full", 4_000, 3, None,
                  {"hidden": [128, 128], "batch_size": 64, "random_steps": 1000, "update_after": 1000}, 10),
    "quick": Suite("quick", 400, 1, ("pendulum_g10", "pendulum_heavy"),
                   {"hidden": [32], "batch_size": 16, "random_steps": 200, "update_after": 200, "buffer_size": 1000}, 1,
                   note="a smoke run of every arm, nothing learned"),
}


@dataclass
class Plan:
    suite: Suite
    arms: tuple[str, ...]
    seeds: tuple[int, ...]
    csv_path: Path
    cells: dict[CellKey, Cell] = field(default_factory=dict)



def cell_key(arm: str, seed: int) -> CellKey:
    """A cell of the CSV: the arm's label is its scope (CARE runs with two methods)."""
    return CellKey(DATASET, "multi_task", ARMS[arm].method, ARMS[arm].encoder["name"], seed, scope=arm)


def plan(suite: str, arms: Sequence[str] | None, seeds: int | Sequence[int] | None, csv_path: Path,
         steps: int | None = None) -> Plan:
    """The cells to run: ``seeds`` is a count (seeds 0..N-1) or the seeds themselves (None: the suite's count)."""
    if suite not in SUITES:
        raise InvalidParameterError(f"unknown bench rl suite {suite!r}.{closest(suite, SUITES)} Suites: {', '.join(SUITES)}")
    chosen = SUITES[suite]
    if steps is not None:
        if steps < 200 or steps % 200:
            raise InvalidParameterError(f"--steps of bench rl must be a positive multiple of the episode length (200); "
                                        f"found {steps}")
        chosen = Suite(chosen.name, steps, chosen.seeds, chosen.tasks, chosen.sac, chosen.eval_episodes, chosen.note,
                       chosen.arms)
    arms = tuple(arms or chosen.arms)
    for arm in arms:
        if arm not in ARMS:
            raise InvalidParameterError(f"unknown bench rl arm {arm!r}.{closest(arm, ARMS)} Arms: {', '.join(ARMS)}")
    chosen_seeds = tuple(range(chosen.seeds if seeds is None else seeds)) if seeds is None or isinstance(seeds, int) else (
        tuple(seeds))
    if not chosen_seeds or any(s < 0 for s in chosen_seeds):
        raise InvalidParameterError(f"--seeds of bench rl must be a count >= 1 or a comma list of seeds >= 0; found {seeds}")
    return Plan(chosen, arms, chosen_seeds, csv_path, read(csv_path))


def config(suite: Suite, arm: Arm, seed: int) -> dict[str, Any]:
    """The ``polytask rl train`` config of one cell (no run directory: nothing but the CSV is written)."""
    env: dict[str, Any] = {"name": DATASET}
    if suite.tasks is not None:
        env["tasks"] = list(suite.tasks)
    return {"seed": seed, "output_dir": f"runs/bench_rl/{arm.label}-{seed}", "env": env, "encoder": dict(arm.encoder),
            "context": arm.context, "method": arm.method, "sac": dict(suite.sac),
            "train": {"steps": suite.steps, "eval_every": suite.steps, "eval_episodes": suite.eval_episodes,
                      "checkpoint_every": suite.steps, "progress": False}}


def run_cell(suite: Suite, arm: Arm, seed: int) -> Cell:
    from polytask.rl.config import load_rl_config
    from polytask.rl.trainer import build

    started = time.perf_counter()
    trainer = build(load_rl_config(raw=config(suite, arm, seed)))
    try:
        summary = trainer.fit()
    finally:
        trainer.env.close()
        trainer.eval_env.close()
    metrics: dict[str, dict[str, float]] = {task: {"return": float(values["return"]), "success": float(values["success"])}
                                            for task, values in summary["final"].items()}
    metrics["all"] = {"steps_per_second": float(summary["steps_per_second"])}
    return Cell(cell_key(arm.label, seed), metrics, epochs=suite.steps, seconds=time.perf_counter() - started, tasks=tuple(metrics))


def reference_cell(suite: Suite) -> Cell:
    """The physics-aware hand controller over the same evaluation seeds as seed 0's runs."""
    from polytask.rl.envs.pendulum import TASKS, PendulumFamily
    from polytask.rl.trainer import reset_seeds

    env = PendulumFamily(tasks=suite.tasks)
    started = time.perf_counter()
    returns, success = np.zeros(env.num_tasks), np.zeros(env.num_tasks)
    for k in range(suite.eval_episodes):
        obs = env.reset(reset_seeds(0, env.num_tasks, k, evaluation=True))
        held = np.zeros(env.num_tasks)
        for _ in range(env.max_episode_steps):
            result = env.step(np.array([[swing_up(o, TASKS[t].gravity, TASKS[t].mass, TASKS[t].length)]
                                        for o, t in zip(obs, env.task_names, strict=True)]))
            returns += result.reward
            held = np.fmax(held, result.success)
            obs = result.obs
        success += held
    metrics = {t: {"return": returns[i] / suite.eval_episodes, "success": success[i] / suite.eval_episodes}
               for i, t in enumerate(env.task_names)}
    return Cell(CellKey(DATASET, "reference", "controller", "physics", 0, scope="controller"), metrics,
                seconds=time.perf_counter() - started, tasks=tuple(metrics))


def swing_up(obs: np.ndarray, gravity: float, mass: float, length: float) -> float:
    """An action in [-1, 1]: pump energy E = θ̇²/(2·3g/(2l)) + cos θ towards the upright value 1, then a PD law near the top."""
    cos, sin, speed = (float(v) for v in obs)
    pull, gain = 3 * gravity / (2 * length), 3 / (mass * length ** 2)  # θ̈ = pull·sin θ + gain·u
    if cos > 0.85:
        torque = (-(pull + 8) * math.atan2(sin, cos) - 4 * speed) / gain
    else:
        energy = 0.5 * speed ** 2 / pull + cos
        torque = 2.0 * (math.copysign(1.0, speed * (1 - energy)) if abs(speed) > 1e-3 else 1.0)
    return float(np.clip(torque / 2.0, -1.0, 1.0))


def run(plan: Plan, echo: Callable[[str], None] = print) -> dict[CellKey, Cell]:
    """Every unfinished cell of the plan, appended to the CSV as it ends; all cells of the CSV."""
    cells = plan.cells
    reference = CellKey(DATASET, "reference", "controller", "physics", 0, scope="controller")
    if reference not in cells:
        cells[reference] = reference_cell(plan.suite)
        append(plan.csv_path, cells[reference])
    for seed in plan.seeds:
        for label in plan.arms:
            key = cell_key(label, seed)
            tasks = [*(plan.suite.tasks or _all_tasks()), "all"]
            if finished(cells, key, tasks):
                continue
            cell = run_cell(plan.suite, ARMS[label], seed)
            append(plan.csv_path, cell)
            cells[key] = cell
            mean = statistics.fmean(v["return"] for t, v in cell.metrics.items() if t != "all")
            echo(f"{label} seed {seed}: mean return {mean:.1f}, {cell.metrics['all']['steps_per_second']:.1f} steps/s, "
                 f"{cell.seconds:.0f} s")
    return cells


def _all_tasks() -> tuple[str, ...]:
    from polytask.rl.envs.pendulum import TASKS

    return tuple(TASKS)


def _pm(values: Sequence[float], digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def markdown(cells: dict[CellKey, Cell], plan: Plan, *, csv_name: str, load: str = "") -> str:
    """The results section: per-task return (mean ± std over seeds) per arm, the mean over tasks, success rates, speed."""
    suite = plan.suite
    tasks = list(suite.tasks or _all_tasks())
    arms = [a for a in plan.arms if any(k.scope == a and k.kind == "multi_task" for k in cells)]

    def values(arm: str, task: str, metric: str) -> list[float]:
        return [c.metrics[task][metric] for k, c in sorted(cells.items(), key=lambda kv: kv[0].seed)
                if k.scope == arm and k.kind == "multi_task" and task in c.metrics and metric in c.metrics[task]]

    def mean_over_tasks(arm: str, metric: str) -> list[float]:
        per_seed = [[c.metrics[t][metric] for t in tasks] for k, c in cells.items()
                    if k.scope == arm and k.kind == "multi_task" and all(t in c.metrics for t in tasks)]
        return [statistics.fmean(v) for v in per_seed]

    reference = next((c for k, c in cells.items() if k.kind == "reference"), None)
    seeds = sorted({k.seed for k in cells if k.kind == "multi_task"})
    header = "| task | " + " | ".join(arms) + (" | reference controller |" if reference else " |")
    rule = "| --- " * (len(arms) + 1 + (1 if reference else 0)) + "|"
    lines = [f"Generated by `polytask bench rl{' --quick' if suite.name == 'quick' else ''}` from [`{csv_name}`]({csv_name}) "
             "(rerun the command to regenerate: finished cells are read back, not retrained).", "",
             f"Budget: {suite.describe()}; seeds {', '.join(map(str, seeds))}." + (f" {suite.note}." if suite.note else ""),
             "", "Evaluation return per task (higher is better; Pendulum's reward is ≤ 0), mean ± standard deviation "
             "over seeds:", "", header, rule]
    for metric, digits in (("return", 1), ("success", 2)):
        if metric == "success":
            lines += ["", "Success rate per task (the pendulum held upright, |θ| ≤ 0.3 rad, for 50 consecutive steps "
                      "at some point of the episode):", "", header, rule]
        for task in tasks:
            ref = f" {reference.metrics[task][metric]:.{digits}f} |" if reference and task in reference.metrics else (
                " – |" if reference else "")
            lines.append(f"| {task} | " + " | ".join(_pm(values(a, task, metric), digits) for a in arms) + " |" + ref)
        ref_mean = (f" {statistics.fmean(reference.metrics[t][metric] for t in tasks):.{digits}f} |"
                    if reference else "")
        lines.append("| **mean over tasks** | " + " | ".join(f"**{_pm(mean_over_tasks(a, metric), digits)}**" for a in arms)
                     + " |" + ref_mean)
    lines += ["", "Environment steps per second of the whole loop (collection + updates + the final evaluation; one "
              f"step = one transition of each of the {len(tasks)} tasks), mean over seeds{', ' + load if load else ''}:", "",
              "| | " + " | ".join(arms) + " |", "| --- " * (len(arms) + 1) + "|",
              "| steps/s | " + " | ".join(_pm(values(a, "all", "steps_per_second"), 1) for a in arms) + " |",
              "| seconds per run | " + " | ".join(
                  _pm([c.seconds for k, c in cells.items() if k.scope == a and k.kind == "multi_task"], 0) for a in arms)
              + " |"]
    return "\n".join(lines) + "\n"
