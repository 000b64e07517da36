"""FORUM's cost per step against equal weighting: interleaved rounds in one process, medians.

    python docs/results/forum_speed.py [TASKS] [ROUNDS]

The issue-17 MLP (512 → 1024 → 1024 → 256, batch 256, regression heads); bilevel methods get the
first half of the batch as the step's (inner) batch and a closure over both halves, as the Trainer
builds it. Ratios only: run it on a quiet machine for absolute times.
"""
import statistics
import sys
import time

import torch

from polytask.bench.speed import equal_step, jacobian_step, make_problem
from polytask.engine import Engine
from polytask.methods import METHODS

torch.set_num_threads(1)
problem = make_problem("mlp", int(sys.argv[1]) if len(sys.argv) > 1 else 10, torch.device("cpu"))
rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 7
names = {id(p): n for n, p in problem.model.named_parameters()}
halves = {"inner": slice(0, None, 2), "outer": slice(1, None, 2)}


def half_losses(replace, batch="outer"):
    rows = halves[batch]
    out = torch.func.functional_call(problem.model, {names[i]: v for i, v in replace.items()}, (problem.x[rows],))
    return {t: (out[t] - problem.y[rows, i]).pow(2).mean() for i, t in enumerate(problem.tasks)}


def bilevel_step(name: str, **params):
    method = METHODS.create(name, **params)
    method.setup(problem.tasks)
    engine = Engine(method, problem.model.shared_parameters(), jacobian="loop")

    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        out = problem.model(problem.x[halves["inner"]])
        rows = halves["inner"]
        losses = {t: (out[t] - problem.y[rows, i]).pow(2).mean() for i, t in enumerate(problem.tasks)}
        engine.backward(losses, lookahead=half_losses)
    return step


steps = {"(equal)": equal_step(problem), "(task Jacobian)": jacobian_step(problem),
         "moml": bilevel_step("moml"),
         "forum inner_steps=1": bilevel_step("forum", inner_steps=1),
         "forum inner_steps=5 (default)": bilevel_step("forum")}
times = {k: [] for k in steps}
for s in steps.values():
    s(0)  # warm-up
for r in range(rounds):
    for k, s in steps.items():
        t0 = time.perf_counter()
        s(r + 1)
        times[k].append(time.perf_counter() - t0)
ew = statistics.median(times["(equal)"])
jac = statistics.median(times["(task Jacobian)"])
print(f"T = {len(problem.tasks)}, {rounds} interleaved rounds, 1 thread")
print("| method | ms/step (median) | × EW | × Jacobian |\n| --- | --- | --- | --- |")
for k, v in times.items():
    m = statistics.median(v)
    print(f"| {k} | {1000 * m:.0f} | {m / ew:.2f} | {m / jac:.2f} |")
