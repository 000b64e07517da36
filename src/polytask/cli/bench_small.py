"""`polytask bench small`: methods' fixed per-step costs on a tiny model, and the Trainer against a
hand-written loop on the demo model (issue 18, items 3 and 4)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any, bench_sub: Any) -> None:
    small = bench_sub.add_parser(
        "small", help="ms per step of methods on a tiny model (MLP 16→64→64, T=4, batch 32) against one plain backward "
        "and the task Jacobian, and the Trainer against a hand-written loop on the demo model")
    small.add_argument("--methods", help="comma list of method names, or all (default: mgda, upgrad, pcgrad, cagrad, "
                       "nash_mtl, equal, rlw, uncertainty, famo, dwa)")
    small.add_argument("--rounds", type=int, help="interleaved rounds, median reported (default 15; --routes: 7)")
    small.add_argument("--block", type=int, help="steps per timed block (default 20; --routes: 10)")
    small.add_argument("--repeats", type=int, default=7,
                       help="interleaved epochs of the Trainer-vs-loop comparison (0: skip it)")
    small.add_argument("--threads", type=int, default=1, help="intra-op threads while timing")
    small.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                       help="wall: elapsed time; cpu: this process's CPU time, far less sensitive to other processes "
                       "on a shared machine (with --threads 1 it is the time spent on the step)")
    small.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N: where the tiny model or the route sweep "
                       "runs (cuda takes --clock wall; the Trainer-vs-loop figure stays on the CPU)")
    small.add_argument("--routes", action="store_true",
                       help="instead: mgda's step on the J route and on the no-J Gramian route of MLPs from 21 k to "
                       "5 M Jacobian entries, ×floor, and the route `engine.gramian: auto` takes on each")
    small.set_defaults(handler=handle)


def handle(args: argparse.Namespace) -> int:
    import os

    from polytask.bench import small
    from polytask.core.errors import InvalidParameterError
    from polytask.methods.base import METHODS

    if args.methods is None:
        methods = list(small.DEFAULT_METHODS)
    elif args.methods == "all":
        methods = METHODS.names()
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rounds = args.rounds if args.rounds is not None else 7 if args.routes else 15
    block = args.block if args.block is not None else 10 if args.routes else 20
    for name, value in (("--rounds", rounds), ("--block", block)):
        if value < 1:
            raise InvalidParameterError(f"{name} must be >= 1; found {value}")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} (the machine's; ratios are within one process)")
    if args.routes:
        small.run_routes(rounds=rounds, block=block, threads=args.threads, clock=args.clock, device=args.device)
        return 0
    small.run(methods, rounds=rounds, block=block, overhead_repeats=args.repeats, threads=args.threads,
              clock=args.clock, device=args.device)
    return 0
