"""Interleaved timing of issue 17's additions (one process, rounds of one step each, medians): ratios to EW."""
import statistics
import sys
import time

import torch

from polytask.bench.speed import equal_step, jacobian_step, make_problem, method_step
from polytask.engine import Engine
from polytask.methods import METHODS

torch.set_num_threads(1)
problem = make_problem("mlp", 10, torch.device("cpu"))
names = sys.argv[1].split(",")
steps = {"(equal)": equal_step(problem), "(jacobian)": jacobian_step(problem)}
steps.update({n: method_step(problem, n, "auto", 1) for n in names})


def parts_step(name: str):  # the real configuration: each task's loss on both halves of the batch
    method = METHODS.create(name)
    method.setup(problem.tasks)
    engine = Engine(method, problem.model.shared_parameters())
    halves = (slice(0, None, 2), slice(1, None, 2))

    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        parts = []
        for rows in halves:
            z = problem.model.encode(problem.x[rows])
            out = problem.model.decode(z)
            parts.append({t: (out[t] - problem.y[rows, i]).pow(2).mean() for i, t in enumerate(problem.tasks)})
        engine.backward({t: torch.stack([p[t] for p in parts]) for t in problem.tasks})
    return step


def lookahead_step(name: str, **params):  # bilevel: inner half for the step, outer half in a closure
    method = METHODS.create(name, **params)
    method.setup(problem.tasks)
    engine = Engine(method, problem.model.shared_parameters())
    names = {id(p): n for n, p in problem.model.named_parameters()}
    inner, outer = slice(0, None, 2), slice(1, None, 2)

    def outer_losses(replace):
        out = torch.func.functional_call(problem.model, {names[i]: v for i, v in replace.items()}, (problem.x[outer],))
        return {t: (out[t] - problem.y[outer, i]).pow(2).mean() for i, t in enumerate(problem.tasks)}

    def step(i: int) -> None:
        problem.model.zero_grad(set_to_none=True)
        out = problem.model(problem.x[inner])
        losses = {t: (out[t] - problem.y[inner, i]).pow(2).mean() for i, t in enumerate(problem.tasks)}
        engine.backward(losses, lookahead=outer_losses)
    return step


if "auto_lambda" in names:
    steps["auto_lambda (lookahead)"] = lookahead_step("auto_lambda", mode="lookahead")
if "moml" in names:
    steps["moml (lookahead)"] = lookahead_step("moml")
    del steps["moml"]  # its lookahead=False form is the contract suites
for extra in ("modo", "sdmgrad"):
    if extra in names:
        steps[f"{extra} (parts=2)"] = parts_step(extra)
times = {k: [] for k in steps}
for s in steps.values():
    s(0)  # warm-up
for r in range(int(sys.argv[2]) if len(sys.argv) > 2 else 5):
    for k, s in steps.items():
        t0 = time.perf_counter()
        s(r + 1)
        times[k].append(time.perf_counter() - t0)
ew = statistics.median(times["(equal)"])
jac = statistics.median(times["(jacobian)"])
print("| method | ms/step (median) | × EW | × Jacobian |\n| --- | --- | --- | --- |")
for k, v in times.items():
    m = statistics.median(v)
    print(f"| {k} | {1000 * m:.0f} | {m / ew:.2f} | {m / jac:.2f} |")
