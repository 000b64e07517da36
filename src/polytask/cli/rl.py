"""Multi-task reinforcement learning from the command line: `polytask rl train CONFIG` and
`polytask rl speed` (environment steps per second of the whole loop per encoder, and the cost of
a CARE update against a shared-MLP one)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(sub: Any, bench_sub: Any) -> None:
    rl = sub.add_parser("rl", help="multi-task reinforcement learning (multi-task SAC, CARE)")
    rl_sub = rl.add_subparsers(dest="rl_command", required=True)
    train = rl_sub.add_parser("train", help="train a multi-task SAC agent from a YAML config (see docs/rl.md)")
    train.add_argument("config", type=Path)
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override any config key, e.g. --set train.steps=2000 (repeatable)")
    train.add_argument("--resume", action="store_true", help="continue the run in output_dir from its last checkpoint")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run in output_dir")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=_train)

    speed = rl_sub.add_parser("speed", help="environment steps/s of the whole loop per encoder, and the CARE "
                              "update's cost against the shared-MLP update's (medians of interleaved repeats)")
    speed.add_argument("--env", default="pendulum", help="a registered family (default: pendulum)")
    speed.add_argument("--encoders", default="shared_mlp,onehot_mlp,per_task_heads,care")
    speed.add_argument("--method", default="equal", help="the engines' method (e.g. pcgrad)")
    speed.add_argument("--steps", type=int, default=200, help="loop steps timed per encoder")
    speed.add_argument("--repeats", type=int, default=30, help="interleaved update timings per encoder")
    speed.add_argument("--threads", type=int, default=1, help="torch threads")
    speed.add_argument("--hidden", default="400,400,400", help="trunk widths of the actor and critics (mtrl's default)")
    speed.add_argument("--batch-size", type=int, default=128, help="transitions per task per update")
    speed.set_defaults(handler=_speed)


def _train(args: argparse.Namespace) -> int:
    from polytask.rl.config import load_rl_config
    from polytask.rl.trainer import train

    cfg = load_rl_config(args.config, args.overrides)
    if args.quiet:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"progress": False})})
    summary = train(cfg, resume=args.resume, overwrite=args.overwrite)
    print(json.dumps({"output_dir": str(cfg.output_dir), "steps": summary["steps"],
                      "steps_per_second": round(summary["steps_per_second"], 1),
                      "final": summary["final"]}, indent=2))
    return 0


def _speed(args: argparse.Namespace) -> int:
    from polytask.rl.speed import format_table, measure, sac_options

    rows = measure(env=args.env, encoders=[e.strip() for e in args.encoders.split(",") if e.strip()],
                   method=args.method, steps=args.steps, repeats=args.repeats, threads=args.threads,
                   sac=sac_options(args.hidden, args.batch_size))
    print(format_table(rows))
    return 0
