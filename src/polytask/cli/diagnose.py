"""`polytask report RUN_DIR [RUN_DIR ...]` (one HTML page) and `polytask inspect RUN_DIR --groups B`
(task affinity, the best split into groups, a config per group)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any, bench_sub: Any) -> None:
    report = sub.add_parser("report", help="write one self-contained HTML page from one or more run directories")
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--output", type=Path, help="the HTML file (default: report.html in the first run directory)")
    report.set_defaults(handler=_report)

    inspect = sub.add_parser("inspect", help="task affinity of a run and the best split of its tasks into groups")
    inspect.add_argument("run_dir", type=Path)
    inspect.add_argument("--groups", type=int, required=True, metavar="B", help="at most B groups")
    inspect.add_argument("--source", choices=("auto", "affinity", "cosine"), default="auto",
                         help="the matrix to group from: TAG affinity, mean gradient cosine, or affinity when measured "
                              "(default)")
    inspect.add_argument("--write-configs", type=Path, metavar="DIR",
                         help="write one YAML config per group into DIR (the run's config.yaml with only that group's "
                              "tasks and its own output_dir)")
    inspect.set_defaults(handler=_inspect)


def _report(args: argparse.Namespace) -> int:
    from polytask.diagnostics.report import write_report

    output = args.output if args.output is not None else args.run_dirs[0] / "report.html"
    path = write_report(args.run_dirs, output)
    print(json.dumps({"report": str(path), "runs": [str(p) for p in args.run_dirs]}))
    return 0


def matrix_of(run_dir: Path, source: str) -> tuple[list[str], list[list[float | None]], str]:
    """The tasks, the matrix and its name from a run's diagnostics/summary.json."""
    from polytask.core.errors import InvalidParameterError
    from polytask.diagnostics.report import ENABLE, read_run

    run = read_run(run_dir)
    diag = run.diagnostics or {}
    affinity, conflict = diag.get("affinity") or {}, diag.get("conflict") or {}
    has_affinity = bool((affinity.get("overall") or {}).get("steps"))
    has_conflict = bool((conflict.get("overall") or {}).get("steps"))
    if source in ("auto", "affinity") and has_affinity:
        return affinity["tasks"], affinity["overall"]["mean"], "TAG affinity"
    if source in ("auto", "cosine") and has_conflict:
        return conflict["tasks"], conflict["overall"]["mean_cosine"], "mean gradient cosine"
    wanted = "affinity" if source != "cosine" else "conflict"
    raise InvalidParameterError(f"run '{run_dir}' has no {'TAG affinity' if wanted == 'affinity' else 'gradient cosines'} "
                                f"in diagnostics/summary.json; to get it: {ENABLE[wanted]}")


def _inspect(args: argparse.Namespace) -> int:
    from polytask.diagnostics.grouping import best_grouping

    tasks, matrix, name = matrix_of(args.run_dir, args.source)
    width = max(len(t) for t in tasks) + 2
    print(f"{name} (row: source task, column: target task), {args.run_dir}")
    print(" " * width + "".join(f"{t:>{width}}" for t in tasks))
    for t, row in zip(tasks, matrix, strict=True):
        print(f"{t:<{width}}" + "".join(f"{'–' if v is None else f'{v:+.4f}':>{width}}" for v in row))
    grouping = best_grouping(matrix, tasks, args.groups)
    print(f"\nbest split into at most {args.groups} groups: total score {grouping.total:+.4f}")
    for number, (group, score) in enumerate(zip(grouping.groups, grouping.group_scores(), strict=True), start=1):
        per_task = ", ".join(f"{t} {grouping.task_scores[t]:+.4f}" for t in group)
        print(f"  group {number}: {', '.join(group)}  (score {score:+.4f}: {per_task})")
    if args.write_configs is not None:
        for path in write_group_configs(args.run_dir, grouping.groups, args.write_configs):
            print(f"wrote {path}")
    return 0


def write_group_configs(run_dir: Path, groups: Any, folder: Path) -> list[Path]:
    """One config per group: the run's config.yaml with ``tasks`` cut to the group and
    ``output_dir`` = <the run's output_dir>-group-<n>. Refuses a run without config.yaml, or
    whose tasks are not named in it (a Trainer run from Python)."""
    import yaml

    from polytask.core.errors import ConfigError
    from polytask.train.checkpoint import atomic_write_text

    source = run_dir / "config.yaml"
    if not source.is_file():
        raise ConfigError(f"run '{run_dir}' has no config.yaml (a run trained from Python); --write-configs needs the "
                          "config the run was trained from")
    config = yaml.safe_load(source.read_text())
    if not isinstance(config, dict):
        raise ConfigError(f"{source} does not hold a YAML mapping")
    tasks = config.get("tasks") or {}
    missing = [t for g in groups for t in g if t not in tasks]
    if missing:
        raise ConfigError(f"{source}: tasks {missing} are not under `tasks:`; cannot cut the config to a group")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--write-configs '{folder}' is a file; give a folder")
    base = str(config.get("output_dir") or f"runs/{run_dir.name}").rstrip("/")
    paths = []
    for number, group in enumerate(groups, start=1):
        cut = dict(config)
        cut["tasks"] = {t: tasks[t] for t in group}
        cut["output_dir"] = f"{base}-group-{number}"
        _fit_to_group(cut, group)
        path = folder / f"group-{number}.yaml"
        header = f"# group {number} of {len(groups)} from `polytask inspect {run_dir}`: {', '.join(group)}\n"
        atomic_write_text(path, header + yaml.safe_dump(cut, sort_keys=False))
        paths.append(path)
    return paths


def _fit_to_group(config: dict[str, Any], group: Any) -> None:
    """What the group's own tasks change: a bundled data set sizes the encoder's input itself
    (Adult drops the hours column only with the hours task), and a monitor on a task outside the
    group falls back to the loss."""
    model = config.get("model")
    data = config.get("data") or {}
    if isinstance(model, dict) and isinstance(model.get("encoder"), dict) and data.get("dataset"):
        model["encoder"] = {k: v for k, v in model["encoder"].items() if k != "in_features"}
    train = config.get("train")
    if isinstance(train, dict) and isinstance(train.get("monitor"), str) and "/" in train["monitor"]:
        if train["monitor"].partition("/")[0] not in group:
            train["monitor"] = "loss"
