"""`polytask` command line: train, eval, predict, list.

Nothing here imports torch at module level, so ``polytask --help`` and ``polytask --version``
answer at once; each command imports what it needs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Command modules beyond the built-in ones: ``polytask.cli.<name>`` with a
#: ``register(sub, bench_sub)`` that adds its parsers (``sub``: top-level commands, ``bench_sub``:
#: ``polytask bench`` suites) and sets ``handler=<function(args) -> int>`` on each. They must not
#: import torch at module level (``--help`` stays fast). One line per module, so that separate
#: features add their commands without touching each other's code.
COMMAND_MODULES: tuple[str, ...] = (
    "bench_quality",
    "bench_rl",
    "bench_small",
    "diagnose",
    "distill",
    "rl",
)

LISTS = ("methods", "architectures", "encoders", "samplers", "task_schedulers", "datasets", "metrics", "losses",
         "callbacks", "distillation", "annealing", "rl_encoders", "rl_environments")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polytask", description="Multi-task learning on PyTorch.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a multi-task model from a YAML config")
    train.add_argument("config", type=Path)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set train.epochs=1 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    train.add_argument("--baselines", action="store_true",
                       help="also train each task alone with the same encoder and report Δm against them")
    train.add_argument("--single-task", action="store_true", help="only train each task alone (baselines)")
    train.add_argument("--quiet", action="store_true", help="no progress bars")

    ev = sub.add_parser("eval", help="evaluate a finished run on a data split")
    ev.add_argument("run_dir", type=Path)
    ev.add_argument("--split", default="test", choices=("train", "val", "test"))
    ev.add_argument("--checkpoint", default="best", choices=("best", "last"))
    ev.add_argument("--input", type=Path, help="a CSV/Parquet table of input rows with each task's target column, "
                    "instead of a split of the run's data (runs trained from Python have no splits)")

    pr = sub.add_parser("predict", help="predict every task for new inputs (CSV/Parquet table or .npy array)")
    pr.add_argument("run_dir", type=Path)
    pr.add_argument("--input", required=True, type=Path)
    pr.add_argument("--output", type=Path, help="CSV file to write (default: print)")
    pr.add_argument("--checkpoint", default="best", choices=("best", "last"))
    pr.add_argument("--task", help="for runs with per-task inputs: the task whose input columns the file has")
    pr.add_argument("--id-column", help="a column of the input table that identifies its rows (kept in the output; "
                    "default: an `id` column of row numbers)")
    pr.add_argument("--probabilities", action="store_true", help="multiclass: also every class's probability")
    pr.add_argument("--threshold", type=float, default=0.5, help="binary and multilabel: probability for label 1")

    ex = sub.add_parser("export", help="write a trained run's model as ONNX, TorchScript or safetensors")
    ex.add_argument("run_dir", type=Path)
    ex.add_argument("--format", choices=("onnx", "torchscript", "safetensors"),
                    help="default: from the --output suffix, else onnx")
    ex.add_argument("--output", type=Path, help="file to write (default: RUN_DIR/model.onnx|.pt|.safetensors)")
    ex.add_argument("--checkpoint", default="best", choices=("best", "last"))
    ex.add_argument("--task", help="for runs with per-task inputs: the task whose inputs and output to export")

    bench = sub.add_parser("bench", help="benchmarks (not part of the test suite)")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    speed = bench_sub.add_parser("speed", help="ms per step and peak memory of every method vs equal weighting")
    speed.add_argument("--encoders", default="mlp,cnn", help="comma list of mlp, cnn")
    speed.add_argument("--tasks", default="2,5,10,40", help="comma list of task counts")
    speed.add_argument("--methods", default="all", help="comma list of method names, or all")
    speed.add_argument("--steps", type=int, default=5, help="timed steps per measurement (median reported)")
    speed.add_argument("--warmup", type=int, default=2)
    speed.add_argument("--every", type=int, default=1, help="recompute Gramian-method weights every k steps")
    speed.add_argument("--no-features", action="store_true", help="skip the features mode of Gramian methods")
    speed.add_argument("--peers", action="store_true", help="also time TorchJD's aggregators when installed")
    speed.add_argument("--device", default="cpu")
    speed.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                       help="time steps by the wall clock or by the process's CPU time (steadier on a loaded machine)")
    speed.add_argument("--csv", type=Path, help="also write the rows to this CSV file")
    speed.add_argument("--ddp", type=int, default=0, metavar="N",
                       help="time N CPU processes (gloo) instead: step time, bytes sent and parameters held per "
                       "rank, per method, under ddp, fsdp and fsdp-kept (docs/distributed.md)")
    speed.add_argument("--no-small", action="store_true",
                       help="skip the closing tables of `polytask bench small` (the tiny model's fixed per-step "
                       "costs, the Trainer against a hand-written loop)")
    arch = bench_sub.add_parser("architectures", help="parameters, shared parameters and ms/step (equal weighting) "
                                "of every architecture on a fixed synthetic problem")
    arch.add_argument("--tasks", default="3", help="comma list of task counts")
    arch.add_argument("--architectures", default="all", help="comma list of architecture names, or all")
    arch.add_argument("--batch-size", type=int, default=256)
    arch.add_argument("--steps", type=int, default=20, help="timed steps per architecture (median reported)")
    arch.add_argument("--warmup", type=int, default=3)
    arch.add_argument("--device", default="cpu")
    over = bench_sub.add_parser("overhead", help="the Trainer's per-step cost over a hand-written PyTorch loop on "
                                "the demo model (Adult, hard sharing), median of interleaved epochs")
    over.add_argument("--repeats", type=int, default=7)
    over.add_argument("--threads", type=int, default=1)
    heads = bench_sub.add_parser("heads", help="weighted vs unweighted head gradients of gradient methods on the "
                                 "bundled examples: Δm%% against single-task baselines, per seed")
    heads.add_argument("--datasets", default="adult,multimnist,reviews,movielens")
    heads.add_argument("--methods", default="mgda,cagrad,upgrad,nash_mtl,pcgrad")
    heads.add_argument("--seeds", default="0,1,2")
    heads.add_argument("--csv", type=Path, default=Path("runs/bench_heads.csv"),
                       help="results, appended cell by cell; finished cells are not rerun")
    sampling = bench_sub.add_parser("sampling", help="per-task metrics under proportional/temperature/uniform/annealed "
                                    "sampling, task data sets of ~100x/10x/1x size (Adult)")
    sampling.add_argument("--sizes", default="20000,2000,200", help="training rows of income,marital,hours")
    sampling.add_argument("--seeds", default="0,1,2", help="comma list of seeds (mean ± std reported)")
    sampling.add_argument("--epochs", type=int, default=5)
    sampling.add_argument("--batch-size", type=int, default=64)

    import importlib

    for module in COMMAND_MODULES:
        importlib.import_module(f"polytask.cli.{module}").register(sub, bench_sub)

    ls = sub.add_parser("list", help="list registered methods, architectures, encoders, samplers, datasets, metrics, "
                        "RL encoders and environments; "
                        "`list methods NAME` shows one entry's parameters and defaults")
    ls.add_argument("what", nargs="?", choices=LISTS)
    ls.add_argument("name", nargs="?", help="one entry of that list: its description, parameters and defaults")
    return parser


def _version() -> str:
    """``polytask X (torch Y, Python Z)``, read from the installed metadata (torch is not imported)."""
    import platform
    from importlib import metadata

    from polytask import __version__

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"polytask {__version__} (torch {torch}, Python {platform.python_version()})"


def format_number(value: float) -> str:
    """A metric as a reader takes it in: 4 decimals in the usual range, thousands separated from 10⁴
    (an RMSE in dollars), scientific notation beyond 10¹² or below 10⁻³."""
    import math

    if not math.isfinite(value):
        return str(value)
    size = abs(value)
    if size >= 1e12 or 0 < size < 1e-3:
        return f"{value:.3e}"
    if size >= 1e4:
        return f"{value:,.1f}"
    return f"{value:.4f}"


def format_table(results: Mapping[str, Mapping[str, float]], baselines: Mapping[str, Mapping[str, float]] | None = None
                 ) -> str:
    """Per-task metrics, with single-task values and the relative change when given; columns as wide
    as their longest entry."""
    from polytask.metrics.registry import METRICS

    rows: list[list[str]] = []
    for task, metrics in results.items():
        for metric, value in metrics.items():
            row = [task, metric, format_number(value)]
            base = (baselines or {}).get(task, {}).get(metric)
            if baselines:
                if base is None:
                    row += ["", ""]
                else:
                    better = METRICS.higher_is_better(metric) if metric in METRICS else False
                    change = (value - base) / abs(base) * 100 * (1 if better else -1) if base else float("nan")
                    row += [format_number(base), f"{change:+.2f}%"]
            rows.append(row)
    names = ["task", "metric", "multi-task"] + (["single-task", "change"] if baselines else [])
    widths = [max([len(n)] + [len(r[i]) for r in rows]) for i, n in enumerate(names)]
    def line(cells: Sequence[str]) -> str:
        return " ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    header = line(names)
    return "\n".join([header, "-" * len(header), *(line(r) for r in rows)])


def _train(args: argparse.Namespace) -> int:
    from polytask.cli import pipeline
    from polytask.config.schema import load_config

    overrides = list(args.overrides) + (["run.progress=false"] if args.quiet else [])
    cfg = load_config(args.config, overrides)
    summary = pipeline.train(cfg, resume=args.resume, overwrite=args.overwrite, baselines=args.baselines,
                             single_task_only=args.single_task)
    if os.environ.get("RANK", "0") != "0":  # under torchrun one results table, from rank 0
        return 0
    if args.single_task:
        print(format_table(summary["baselines"]))
        return 0
    print(f"\n{summary['method']} on {summary['split']} split (best epoch {summary['best_epoch']}, "
          f"{summary['train_seconds']} s of training); run directory: {cfg.output_dir}")
    print(format_table(summary["tasks"], summary.get("baselines")))
    if summary.get("delta_m_undefined"):
        print(summary["delta_m_undefined"])
    elif "delta_m" in summary:
        print(f"Δm = {summary['delta_m']:+.2f}% against single-task baselines (positive: multi-task is better)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    import csv
    import dataclasses

    import torch

    from polytask.bench import speed
    from polytask.core.errors import InvalidParameterError
    from polytask.methods import METHODS

    if args.suite == "sampling":
        return _bench_sampling(args)
    if args.suite == "overhead":
        from polytask.bench import overhead

        overhead.run(repeats=args.repeats, threads=args.threads)
        return 0
    if args.suite == "heads":
        from polytask.bench import heads as heads_bench

        args.csv.parent.mkdir(parents=True, exist_ok=True)
        cells = heads_bench.run(args.datasets.split(","), args.methods.split(","),
                                [int(s) for s in args.seeds.split(",")], csv_path=args.csv)
        print(heads_bench.table(cells))
        return 0
    if args.suite == "architectures":
        return _bench_architectures(args)
    torch.set_num_threads(torch.get_num_threads())
    methods = METHODS.names() if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        METHODS.get(name)
    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    for encoder in encoders:
        if encoder not in ("mlp", "cnn"):
            raise InvalidParameterError(f"--encoders takes mlp and/or cnn; found {encoder!r}")
    try:
        counts = [int(t) for t in args.tasks.split(",")]
    except ValueError:
        raise InvalidParameterError(f"--tasks takes a comma list of ints; found {args.tasks!r}") from None
    if args.ddp:
        if args.ddp < 2:
            raise InvalidParameterError(f"--ddp needs at least 2 processes; found {args.ddp}")
        from polytask.bench import ddp

        ddp.run(args.ddp, encoders, counts, methods, steps=args.steps, warmup=args.warmup)
        return 0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    rows = speed.run(encoders, counts, methods, steps=args.steps, warmup=args.warmup, features=not args.no_features,
                     every=args.every, peers=args.peers, device=args.device, clock=args.clock)
    if args.csv is not None:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=[f.name for f in dataclasses.fields(speed.Row)])
            writer.writeheader()
            writer.writerows(dataclasses.asdict(r) for r in rows)
    if not args.no_small:
        from polytask.bench import small

        print()
        small.run(clock=args.clock)
    return 0


def _bench_architectures(args: argparse.Namespace) -> int:
    import torch

    from polytask.bench import architectures
    from polytask.core.errors import InvalidParameterError

    try:
        counts = [int(t) for t in args.tasks.split(",")]
    except ValueError:
        raise InvalidParameterError(f"--tasks takes a comma list of ints; found {args.tasks!r}") from None
    names = None if args.architectures == "all" else [a.strip() for a in args.architectures.split(",") if a.strip()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    architectures.run(counts, names, batch_size=args.batch_size, steps=args.steps, warmup=args.warmup, device=args.device)
    return 0


def _bench_sampling(args: argparse.Namespace) -> int:
    from polytask.bench import sampling
    from polytask.core.errors import InvalidParameterError

    try:
        counts = [int(n) for n in args.sizes.split(",")]
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise InvalidParameterError(f"--sizes and --seeds take comma lists of ints; found {args.sizes!r}, {args.seeds!r}") from None
    if len(counts) != len(sampling.DEFAULT_SIZES):
        raise InvalidParameterError(f"--sizes takes {len(sampling.DEFAULT_SIZES)} sizes (income,marital,hours); found {args.sizes!r}")
    sizes = dict(zip(sampling.DEFAULT_SIZES, counts, strict=True))
    print(f"Adult, task training sizes {sizes}, {args.epochs} epochs, batch {args.batch_size}, seeds {seeds}")
    results = sampling.run(sizes=sizes, seeds=seeds, epochs=args.epochs, batch_size=args.batch_size)
    print(sampling.format_results(results, sizes))
    return 0


def _list(what: str | None, name: str | None = None) -> int:
    from polytask.core.losses import LOSSES
    from polytask.data.samplers import SAMPLERS
    from polytask.datasets import DATASETS
    from polytask.distill import ANNEALING, DISTILLATION
    from polytask.methods import METHODS
    from polytask.metrics.registry import METRICS
    from polytask.models import ARCHITECTURES
    from polytask.models.encoders import ENCODERS
    from polytask.rl.encoders import RL_ENCODERS
    from polytask.rl.envs.registry import ENVIRONMENTS
    from polytask.scheduling import TASK_SCHEDULERS
    from polytask.train.callbacks import CALLBACKS

    registries: dict[str, Any] = {"methods": METHODS, "architectures": ARCHITECTURES, "encoders": ENCODERS,
                                  "samplers": SAMPLERS, "task_schedulers": TASK_SCHEDULERS, "datasets": DATASETS,
                                  "losses": LOSSES, "callbacks": CALLBACKS, "distillation": DISTILLATION,
                                  "annealing": ANNEALING, "rl_encoders": RL_ENCODERS, "rl_environments": ENVIRONMENTS}
    if name is not None:
        return _describe(what, name, registries)
    for name in [what] if what else LISTS:
        print(f"{name}:")
        if name == "metrics":
            for metric in METRICS.names():
                spec = METRICS.get(metric)
                direction = "higher is better" if spec.higher_is_better else "lower is better"
                print(f"  {metric:<18} {direction}; {', '.join(spec.kinds)}")
            continue
        registry = registries[name]
        for entry in registry.names():
            extra = f" [needs {_needs(registry.get(entry))}]" if name == "methods" else ""
            print(f"  {entry:<18} {registry.describe(entry)}{extra}")
    return 0


def _needs(method: Any) -> str:
    """What a method class needs, with the batch parts of methods that ask for more than one."""
    parts = getattr(method, "batch_parts", 1)
    outer = " and an outer half-batch (look-ahead)" if getattr(method, "lookahead", False) else ""
    return method.needs + (f" on {parts} parts of each batch" if parts > 1 else "") + outer


def _describe(what: str | None, name: str, registries: Mapping[str, Any]) -> int:
    """`polytask list methods NAME`: the entry's first docstring paragraph, its parameters with
    their defaults, and what it needs."""
    import inspect

    from polytask.core.errors import ConfigError
    from polytask.metrics.registry import METRICS

    if what is None:
        raise ConfigError(f"`polytask list` takes a list before an entry; found only {name!r}: write e.g. "
                          f"`polytask list methods {name}`")
    if what == "metrics":
        spec = METRICS.get(name)
        direction = "higher is better" if spec.higher_is_better else "lower is better"
        print(f"{name}: {direction}; for {', '.join(spec.kinds)} tasks")
        return 0
    registry = registries[what]
    entry = registry.get(name)
    doc = inspect.getdoc(entry) or ""
    print(f"{name} ({registry.kind})")
    paragraph = doc.split("\n\n")[0].strip()
    if paragraph:
        print("\n".join("  " + line for line in paragraph.splitlines()))
    if what == "methods":
        print(f"  needs: {_needs(entry)}")
    params = registry.parameters(name)
    if what == "architectures":  # what the config builds from model.encoder, tasks and model.head
        from polytask.config.build import ARCHITECTURE_RESERVED

        params = {k: p for k, p in params.items() if k not in ARCHITECTURE_RESERVED}
    print("parameters:" if params else "parameters: none")
    for key, param in params.items():
        annotation = "" if param.annotation is param.empty else f": {param.annotation}" if isinstance(
            param.annotation, str) else f": {getattr(param.annotation, '__name__', param.annotation)}"
        default = " (required)" if param.default is param.empty else f" = {param.default!r}"
        print(f"  {key}{annotation}{default}")
    if what == "architectures":
        print("  (set under model.options; the encoder, tasks and heads come from model.encoder, tasks and model.head)")
    return 0


def _format_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                    line: str | None = None) -> str:
    return f"warning: {message}\n"


def _export(args: argparse.Namespace) -> int:
    from polytask.models.export import resolve_format
    from polytask.runs import export

    fmt = args.format or (resolve_format(args.output, None) if args.output else "onnx")
    suffix = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}[fmt]
    path = export(args.run_dir, args.output or args.run_dir / f"model{suffix}", fmt, checkpoint=args.checkpoint,
                  task=args.task)
    print(json.dumps({"format": fmt, "output": str(path)}))
    return 0


class _LogFormat(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:  # "info: …" / "warning: …", as errors are "error: …"
        return f"{record.levelname.lower()}: {record.getMessage()}"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from polytask.core.errors import PolytaskError

    shown = warnings.formatwarning
    warnings.formatwarning = _format_warning  # type: ignore[assignment]  # "warning: …", as errors are "error: …"
    log = logging.getLogger("polytask")  # the library's own lines (an inferred num_classes): "info: …" on stderr
    handler, level = logging.StreamHandler(sys.stderr), log.level
    handler.setFormatter(_LogFormat())
    log.addHandler(handler)
    log.setLevel(logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
    try:
        if getattr(args, "handler", None) is not None:
            return int(args.handler(args))
        if args.command == "train":
            return _train(args)
        if args.command == "list":
            return _list(args.what, args.name)
        if args.command == "export":
            return _export(args)
        if args.command == "bench":
            return _bench(args)
        from polytask.cli import pipeline

        if args.command == "eval":
            print(format_table(pipeline.evaluate(args.run_dir, args.split, args.checkpoint, args.input)))
            return 0
        out = pipeline.predict(args.run_dir, args.input, args.output, args.checkpoint, args.task,
                               id_column=args.id_column, probabilities=args.probabilities,
                               threshold=args.threshold)
        if args.output is None:
            print(out.to_csv(index=False), end="")
        else:
            print(json.dumps({"rows": len(out), "output": str(args.output)}))
        return 0
    except PolytaskError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = shown  # type: ignore[assignment]
        log.removeHandler(handler)
        log.setLevel(level)
        _leave_process_group()


def _leave_process_group() -> None:
    """Under torchrun, close the process group the Trainer joined: gloo's threads still running at
    interpreter exit can abort a rank ("terminate called without an active exception")."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
