"""`polytask bench distill`: single-task teachers vs plain multi-task vs the distilled student.

Per data set (a bundled example config) and seed: ``polytask train --baselines`` (the single-task
runs are the teachers, the multi-task run the plain baseline), then the same config with
``distill: {teachers: <that run>}`` (teacher annealing, linear λ 0 → 1, unless overridden). Test
metrics per task, mean ± std over seeds, Δm against the teachers; then, on the first seed's models,
parameters, forward latency per batch and peak memory of the student against its T teachers
together, and the cost of a distillation step against a plain multi-task step of the same student
(medians of interleaved repetitions in one process).
"""

from __future__ import annotations

import csv
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

VARIANTS = ("teachers", "plain", "distilled")


def _config(dataset: str, seed: int, out: Path, epochs: int | None, overrides: Sequence[str], extra: Sequence[str] = ()):
    from polytask.config.schema import load_config

    sets = [f"seed={seed}", f"output_dir={out}", "run.progress=false", *([f"train.epochs={epochs}"] if epochs else [])]
    return load_config(Path("examples") / f"{dataset}.yaml", [*sets, *overrides, *extra])


def _summary(path: Path) -> dict[str, Any] | None:
    import json

    file = path / "summary.json"
    return json.loads(file.read_text()) if file.exists() and (path / "checkpoints").is_dir() else None


def run(datasets: Sequence[str], seeds: Sequence[int], *, root: Path, epochs: int | None = None,
        overrides: Sequence[str] = (), tag: str | None = None, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Rows {dataset, seed, variant, task, metric, value} and {…, task: 'Δm'}; finished runs are read back.

    ``overrides`` apply to every run (those of ``distill.*`` to the student only); ``tag`` names a
    student variant (its own folder ``distilled_TAG``) that reuses the teachers and plain runs."""
    from polytask.cli import pipeline

    plain_overrides = [o for o in overrides if not o.startswith("distill")]
    rows: list[dict[str, Any]] = []
    for dataset in datasets:
        for seed in seeds:
            base = root / dataset / f"seed{seed}"
            plain_dir, student_dir = base / "plain", base / ("distilled" + (f"_{tag}" if tag else ""))
            plain = _summary(plain_dir)
            if plain is None or not plain.get("baselines"):
                started = time.perf_counter()
                plain = pipeline.train(_config(dataset, seed, plain_dir, epochs, plain_overrides), baselines=True,
                                       overwrite=True)
                echo(f"{dataset} seed {seed}: teachers + plain multi-task in {time.perf_counter() - started:.0f}s, "
                     f"Δm {plain['delta_m']:+.2f}%")
            student = _summary(student_dir)
            if student is None:
                started = time.perf_counter()
                cfg = _config(dataset, seed, student_dir, epochs, overrides, [f"distill.teachers={plain_dir}"])
                student = pipeline.train(cfg, overwrite=True)
                echo(f"{dataset} seed {seed}: distilled student in {time.perf_counter() - started:.0f}s, "
                     f"Δm {student['delta_m']:+.2f}%")
            mains = plain["main_metrics"]
            for variant, values in (("teachers", plain["baselines"]), ("plain", plain["tasks"]),
                                    ("distilled", student["tasks"])):
                for task, metric in mains.items():
                    rows.append({"dataset": dataset, "seed": seed, "variant": variant, "task": task, "metric": metric,
                                 "value": values[task][metric]})
            for variant, summary in (("plain", plain), ("distilled", student)):
                rows.append({"dataset": dataset, "seed": seed, "variant": variant, "task": "Δm", "metric": "%",
                             "value": summary["delta_m"]})
        rows += [{"dataset": dataset, "seed": seeds[0], "variant": "cost", "task": k, "metric": "", "value": v}
                 for k, v in cost(dataset, root / dataset / f"seed{seeds[0]}", epochs, overrides, tag=tag).items()]
    return rows


# ------------------------------------------------------------------------------------------ cost
def _time(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def _cpu_time(fn: Callable[[], Any]) -> float:
    """CPU seconds of this thread: on a loaded machine, the work of ``fn`` without the waits for a core."""
    started = time.thread_time()
    fn()
    return time.thread_time() - started


def _activation_mb(module: torch.nn.Module, forward: Callable[[], Any]) -> float:
    """MB of every leaf module's outputs in one forward: what a training forward keeps for the backward."""
    total = [0]

    def hook(_: Any, __: Any, output: Any) -> None:
        for t in output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]:
            if isinstance(t, torch.Tensor):
                total[0] += t.numel() * t.element_size()

    leaves = [m for m in module.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    return total[0] / 2**20


def cost(dataset: str, base: Path, epochs: int | None, overrides: Sequence[str], repeats: int = 100,
         tag: str | None = None) -> dict[str, float]:
    """Student vs teachers (parameters, forward latency per batch, peak memory) and the step ratio, on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _cost(dataset, base, base / ("distilled" + (f"_{tag}" if tag else "")), epochs, overrides, repeats)
    finally:
        torch.set_num_threads(threads)


def _cost(dataset: str, base: Path, student_dir: Path, epochs: int | None, overrides: Sequence[str],
          repeats: int) -> dict[str, float]:
    import copy

    from polytask.cli import pipeline
    from polytask.cli.distill import resolve_teachers, student
    from polytask.config.build import build_model, trainer_kwargs
    from polytask.data.dataset import TaskDatasets
    from polytask.runs import load
    from polytask.train.trainer import Trainer

    cfg = _config(dataset, 0, student_dir, epochs, overrides, [f"distill.teachers={base / 'plain'}"])
    loaded, encoder, _, _ = pipeline.prepare(cfg)
    stems = loaded.encoder.get("_stems")
    model = load(student_dir).model
    teachers, _, _ = resolve_teachers(cfg, student_dir, loaded, encoder, stems)
    batch_size = cfg.train.batch_size
    train = loaded.train
    first = next(iter(train.datasets.values())) if isinstance(train, TaskDatasets) else train
    x = first.x[:batch_size]
    teacher_models = [t.source for t in teachers.values()]
    out: dict[str, float] = {
        "batch size": len(x),
        "student parameters": sum(p.numel() for p in model.parameters()),
        "teachers parameters": sum(p.numel() for m in teacher_models for p in m.parameters()),
    }
    model.eval()
    for m in teacher_models:
        m.eval()

    def student_forward() -> None:
        with torch.no_grad():
            model(x)

    def teachers_forward() -> None:
        with torch.no_grad():
            for name, m in zip(teachers, teacher_models, strict=True):
                m.decode(m.encode(x, None), [name])

    for fn in (student_forward, teachers_forward):  # warm-up
        fn()
    s_times, t_times = [], []
    for _ in range(repeats):
        s_times.append(_time(student_forward))
        t_times.append(_time(teachers_forward))
    out["student latency ms/batch"] = statistics.median(s_times) * 1e3
    out["teachers latency ms/batch"] = statistics.median(t_times) * 1e3
    out["student activations MB"] = _activation_mb(model, student_forward)
    # the teachers run one after the other: all their weights are loaded, one's activations live at a time
    out["teachers activations MB"] = max(_activation_mb(m, lambda m=m, n=n: m.decode(m.encode(x, None), [n]))
                                         for n, m in zip(teachers, teacher_models, strict=True))
    out["student weights MB"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    out["teachers weights MB"] = sum(p.numel() * p.element_size() for m in teacher_models for p in m.parameters()) / 2**20

    # a distillation step vs a plain step of the same student, on the same batches, interleaved
    kwargs = {**trainer_kwargs(cfg), "run": cfg.run.model_copy(update={"progress": False}), "callbacks": []}
    fresh = build_model(cfg, loaded.tasks, encoder, stems)
    plain_model, distil_model = copy.deepcopy(fresh), copy.deepcopy(fresh)
    data, objectives, _ = student(cfg, student_dir, loaded, encoder, stems, distil_model)
    plain = Trainer(plain_model, loaded.tasks, **kwargs)
    distil = Trainer(distil_model, loaded.tasks, **kwargs, objectives=objectives)
    plain.check(loaded.train)
    distil.check(data)
    plain.steps_this_epoch = distil.steps_this_epoch = 100
    distil.loop = distil.loop.model_copy(update={"epochs": 2})  # λ mid-way (0.25): both terms are computed
    plain_sets = [train] if not isinstance(train, TaskDatasets) else list(train.datasets.values())
    distil_sets = [data] if not isinstance(data, TaskDatasets) else list(data.datasets.values())
    index = torch.arange(min(batch_size, len(plain_sets[0])))
    names = list(train.datasets) if isinstance(train, TaskDatasets) else [None]
    plain_batches = [ds.batch(index, source) for ds, source in zip(plain_sets, names, strict=True)]
    distil_batches = [ds.batch(index, source) for ds, source in zip(distil_sets, names, strict=True)]
    steps = {"plain": lambda: plain._train_step(plain_batches), "distil": lambda: distil._train_step(distil_batches)}
    times: dict[tuple[str, str], list[float]] = {(n, c): [] for n in steps for c in ("wall", "cpu")}
    for i in range(4 * repeats + 4):
        plain.step_index = distil.step_index = 50
        clock, timer = ("cpu", _cpu_time) if i % 4 < 2 else ("wall", _time)
        for name in ("plain", "distil") if i % 2 else ("distil", "plain"):  # alternate: the first of a pair pays more
            elapsed = timer(steps[name])
            if i >= 4:
                times[name, clock].append(elapsed)
    for clock, label in (("wall", ""), ("cpu", " (CPU time)")):
        out[f"plain step ms{label}"] = statistics.median(times["plain", clock]) * 1e3
        out[f"distillation step ms{label}"] = statistics.median(times["distil", clock]) * 1e3
        out[f"step ratio{label}"] = out[f"distillation step ms{label}"] / out[f"plain step ms{label}"]
    return out


# --------------------------------------------------------------------------------------- tables
def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["dataset", "seed", "variant", "task", "metric", "value"])
        writer.writeheader()
        writer.writerows(rows)


def _ms(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {std:.4f}" if abs(mean) < 10 else f"{mean:.2f} ± {std:.2f}"


def markdown(rows: Sequence[dict[str, Any]], datasets: Sequence[str], seeds: Sequence[int], *, epochs: int | None,
             overrides: Sequence[str], tag: str | None = None, output: Path | None = None, root: Path | None = None) -> str:
    budget = f"{epochs} epochs" if epochs else "each example's epochs"
    lines = [f"Generated by `polytask bench distill --datasets {','.join(datasets)} --seeds {','.join(map(str, seeds))}"
             f"{f' --epochs {epochs}' if epochs else ''}{''.join(f' --set {o}' for o in overrides)}"
             f"{f' --tag {tag}' if tag else ''}{f' --root {root}' if root else ''}{f' --output {output}' if output else ''}` "
             f"({budget}; test split; mean ± std over {len(seeds)} seeds; Δm in % against the teachers, positive = "
             "better than the teachers).", ""]
    for dataset in datasets:
        mine = [r for r in rows if r["dataset"] == dataset]
        lines += [f"### {dataset}", "", "| task | metric | teachers (single-task) | plain multi-task | distilled student |",
                  "| --- | --- | --- | --- | --- |"]
        tasks = list(dict.fromkeys(r["task"] for r in mine if r["variant"] in VARIANTS and r["task"] != "Δm"))
        for task in tasks:
            metric = next(r["metric"] for r in mine if r["task"] == task)
            cells = [_ms([r["value"] for r in mine if r["task"] == task and r["variant"] == v]) for v in VARIANTS]
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
        dm = [_ms([r["value"] for r in mine if r["task"] == "Δm" and r["variant"] == v]) for v in ("plain", "distilled")]
        lines += [f"| **Δm %** | | 0 | {dm[0]} | {dm[1]} |", ""]
        c = {r["task"]: r["value"] for r in mine if r["variant"] == "cost"}
        if c:
            sp = c["student weights MB"] + c["student activations MB"]
            tp = c["teachers weights MB"] + c["teachers activations MB"]
            lines += ["| cost (seed 0 models) | student | teachers together | ratio |", "| --- | --- | --- | --- |",
                      f"| parameters | {c['student parameters']:,.0f} | {c['teachers parameters']:,.0f} | "
                      f"{c['student parameters'] / c['teachers parameters']:.2f} |",
                      f"| forward latency, ms per batch | {c['student latency ms/batch']:.2f} | "
                      f"{c['teachers latency ms/batch']:.2f} | "
                      f"{c['student latency ms/batch'] / c['teachers latency ms/batch']:.2f} |",
                      f"| weights, MB | {c['student weights MB']:.2f} | {c['teachers weights MB']:.2f} | "
                      f"{c['student weights MB'] / c['teachers weights MB']:.2f} |",
                      f"| activations of one batch, MB (teachers: the largest) | {c['student activations MB']:.2f} | "
                      f"{c['teachers activations MB']:.2f} | {c['student activations MB'] / c['teachers activations MB']:.2f} |",
                      f"| peak memory (weights + activations), MB | {sp:.2f} | {tp:.2f} | {sp / tp:.2f} |",
                      "", f"Training step of the student (one batch of {c.get('batch size', 0):.0f}, λ = 0.25 so both terms "
                      f"are computed): distillation {c['distillation step ms (CPU time)']:.2f} ms vs plain "
                      f"{c['plain step ms (CPU time)']:.2f} ms of CPU time, ratio **{c['step ratio (CPU time)']:.3f}**; "
                      f"wall clock {c['distillation step ms']:.2f} vs {c['plain step ms']:.2f} ms, ratio "
                      f"{c['step ratio']:.3f} (medians of interleaved repetitions in one process, one thread, on a "
                      "machine loaded by other jobs: the CPU-time ratio is the one to read).", ""]
    return "\n".join(lines) + "\n"
