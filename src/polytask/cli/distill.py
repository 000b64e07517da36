"""Distillation from the command line: `polytask teachers CONFIG`, the `distill:` section of a
training config, and `polytask bench distill` (teachers vs multi-task vs distilled student)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any, bench_sub: Any) -> None:
    teachers = sub.add_parser("teachers", help="train one single-task teacher per task of a config and cache their "
                              "outputs on the training rows, for a student's `distill: {teachers: DIR}`")
    teachers.add_argument("config", type=Path)
    teachers.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                          help="override any config key (repeatable)")
    teachers.add_argument("--output", type=Path, help="the teachers' folder (default: OUTPUT_DIR_teachers)")
    teachers.add_argument("--resume", action="store_true", help="keep the teachers already trained there")
    teachers.add_argument("--overwrite", action="store_true", help="replace an existing teachers' folder")
    teachers.add_argument("--refresh", action="store_true", help="rebuild the output cache even when one exists")
    teachers.set_defaults(handler=_teachers)

    bench = bench_sub.add_parser("distill", help="per task: single-task teachers vs plain multi-task vs the "
                                 "distilled student (metrics ± std over seeds, Δm against the teachers), student vs "
                                 "teachers cost, and a distillation step against a plain one")
    bench.add_argument("--datasets", default="adult,multimnist,reviews")
    bench.add_argument("--seeds", default="0,1,2")
    bench.add_argument("--epochs", type=int, help="epochs of every training (default: each example's)")
    bench.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a key of every config (e.g. distill.temperature=2)")
    bench.add_argument("--tag", help="a student variant's name: its runs go to distilled_TAG, reusing the teachers")
    bench.add_argument("--root", type=Path, default=Path("runs/bench_distill"), help="where the runs go")
    bench.add_argument("--output", type=Path, default=Path("docs/results/distillation.md"),
                       help="the markdown table (its CSV of raw results beside it)")
    bench.set_defaults(handler=_bench)


# ------------------------------------------------------------------------ the distill: section
def _run_dirs(cfg: Any, run_path: Path, tasks: list[Any]) -> tuple[dict[str, Path], Path | None]:
    """The teacher run directory of every distilled task, and the teachers' folder (if one)."""
    from polytask.core.errors import ConfigError, closest  # here: the CLI imports no torch at start

    d = cfg.distill
    names = [t.name for t in tasks]
    for name in d.tasks or []:
        if name not in names:
            raise ConfigError(f"distill.tasks names unknown task '{name}'.{closest(name, names)} Tasks: {', '.join(names)}")
    chosen = list(d.tasks or names)
    if isinstance(d.teachers, dict):
        for name in d.teachers:
            if name not in names:
                raise ConfigError(f"distill.teachers names unknown task '{name}'.{closest(name, names)} "
                                  f"Tasks: {', '.join(names)}")
        return {t: Path(d.teachers[t]) for t in chosen if t in d.teachers}, None
    folder = run_path if d.teachers is None else Path(d.teachers)
    if d.teachers is not None and not folder.is_dir():
        raise ConfigError(f"distill.teachers: {folder} does not exist; expected a folder written by `polytask teachers "
                          "CONFIG` (holding single_task/TASK runs), or {task: run directory}")
    base = folder / "single_task" if (folder / "single_task").is_dir() or d.teachers is None else folder
    return {t: base / t for t in chosen}, folder


def resolve_teachers(cfg: Any, run_path: Path, loaded: Any, encoder: dict[str, Any], stems: dict[str, int] | None
                     ) -> tuple[dict[str, Any], dict[str, dict[str, float]], Path]:
    """The teachers of a config's ``distill:`` section, their test metrics and the cache path."""
    import math

    from polytask.config.build import build_model
    from polytask.core.errors import ConfigError  # here: the CLI imports no torch at start
    from polytask.distill import as_teacher
    from polytask.runs import load

    dirs, folder = _run_dirs(cfg, run_path, loaded.tasks)
    by_name = {t.name: t for t in loaded.tasks}
    teachers, metrics = {}, {}
    for name, path in dirs.items():
        task = by_name[name]
        if not path.is_dir():
            raise ConfigError(f"task '{name}': teacher run directory {path} does not exist; expected a finished "
                              "single-task run (`polytask teachers CONFIG` trains them)")
        if (path / "config.yaml").exists():
            teachers[name] = as_teacher(task, path, checkpoint=cfg.distill.checkpoint)
        else:  # a single-task run of the pipeline: built like the student, with this task alone
            model = build_model(cfg, [task], encoder, {name: stems[name]} if stems else None)
            teachers[name] = as_teacher(task, load(path, cfg.distill.checkpoint, model=model).model)
        teachers[name].name = str(path)
        summary = path / "summary.json"
        if summary.exists():
            found = json.loads(summary.read_text()).get("tasks", {})
            values = found.get(name) or (next(iter(found.values())) if len(found) == 1 else None)
            if values:
                metrics[name] = {k: math.nan if v is None else v for k, v in values.items()}
    cache = cfg.distill.cache or ((folder or run_path) / "teachers" / "cache.pt")
    return teachers, metrics, Path(cache)


def check(cfg: Any, loaded: Any, encoder: dict[str, Any], stems: dict[str, int] | None) -> None:
    """Everything of ``distill:`` that can be checked before a file is written (explicit teachers load)."""
    from polytask.distill import OutputDistillation

    d = cfg.distill
    dirs, _ = _run_dirs(cfg, Path(cfg.output_dir), loaded.tasks)
    OutputDistillation(loaded.tasks, only=list(dirs), temperature=d.temperature, anneal=d.anneal, weight=d.weight)
    if d.teachers is not None:
        resolve_teachers(cfg, Path(cfg.output_dir), loaded, encoder, stems)


def student(cfg: Any, run_path: Path, loaded: Any, encoder: dict[str, Any], stems: dict[str, int] | None,
            model: Any) -> tuple[Any, list[Any], dict[str, dict[str, float]]]:
    """The student's training data (with the teachers' cached outputs), objectives and the teachers' metrics."""
    import torch

    from polytask.data.dataset import TaskDatasets
    from polytask.distill import FeatureDistillation, OutputDistillation, attach, cached_outputs

    d = cfg.distill
    teachers, metrics, cache = resolve_teachers(cfg, run_path, loaded, encoder, stems)
    features = d.features is not None
    outputs = cached_outputs(teachers, loaded.train, cache, features=features)
    objectives: list[Any] = [OutputDistillation(loaded.tasks, only=list(teachers), temperature=d.temperature,
                                                anneal=d.anneal, weight=d.weight)]
    if features:
        first = next(iter(teachers))
        ds = loaded.train.datasets[first] if isinstance(loaded.train, TaskDatasets) else loaded.train
        was_training = model.training
        model.eval()  # no dropout draw: the student's random stream stays that of a plain run
        with torch.no_grad():
            z = model.encode(ds.x[:2], first if isinstance(loaded.train, TaskDatasets) else None)
        model.train(was_training)
        objectives.append(FeatureDistillation(loaded.tasks, only=list(teachers), student_dim=z.reshape(len(z), -1).shape[1],
                                              teacher_dims={t: f.shape[1] for t, f in outputs.features.items()},
                                              weight=d.features.weight, lr=d.features.lr,
                                              weight_decay=d.features.weight_decay))
    return attach(loaded.train, outputs), objectives, metrics


# ------------------------------------------------------------------------------ the commands
def _teachers(args: argparse.Namespace) -> int:
    from polytask.cli import pipeline
    from polytask.config.schema import DistillConfig, load_config
    from polytask.distill import cached_outputs

    cfg = load_config(args.config, args.overrides)
    folder = args.output or Path(f"{cfg.output_dir}_teachers")
    cfg = cfg.model_copy(update={"output_dir": folder})
    summary = pipeline.train(cfg, resume=args.resume, overwrite=args.overwrite, single_task_only=True)
    loaded, encoder, _, _ = pipeline.prepare(cfg)
    distill = cfg.distill or DistillConfig()
    cfg = cfg.model_copy(update={"distill": distill.model_copy(update={"teachers": folder})})
    teachers, _, cache = resolve_teachers(cfg, folder, loaded, encoder, loaded.encoder.get("_stems"))
    cached_outputs(teachers, loaded.train, cache, features=distill.features is not None, refresh=args.refresh)
    for task, values in summary["baselines"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in values.items() if isinstance(v, float))
        print(f"teacher {task}: {shown}")
    print(f"teachers in {folder / 'single_task'}, outputs cached in {cache}; a student uses them with "
          f"`distill: {{teachers: {folder}}}`")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from polytask.distill import report

    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    rows = report.run(datasets, seeds, root=args.root, epochs=args.epochs, overrides=args.overrides, tag=args.tag,
                      echo=lambda line: print(line, flush=True))
    text = report.markdown(rows, datasets, seeds, epochs=args.epochs, overrides=args.overrides, tag=args.tag,
                           output=args.output, root=args.root)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    report.write_csv(rows, args.output.with_suffix(".csv"))
    print(text)
    return 0
