"""`polytask bench speed --ddp N`: step time and communication volume per method with N CPU
processes (gloo) on the benchmark problem, under DDP (the whole model on every rank) and FSDP
(``run.distributed: fsdp``: every rank holds 1/N of each parameter); each rank takes its share of
the global batch.

Communication is measured, not derived: :class:`~polytask.engine.comm.CollectiveCounter` sees every
collective a step issues (the engine's all-reduces, FSDP's all-gathers and reduce-scatters) and
counts each rank's bytes on the wire under ring algorithms. The parameters column is what one rank
holds, so the FSDP/DDP ratio of memory is read beside the ratio of traffic."""

from __future__ import annotations

import os
import socket
import statistics
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from polytask.bench.speed import make_problem
from polytask.core.errors import InvalidParameterError
from polytask.engine.backward import Engine
from polytask.engine.comm import CollectiveCounter, Communicator
from polytask.engine.sharded import ShardedEngine, local_shard
from polytask.methods.base import METHODS, example_method
from polytask.train.fsdp import shard_model

#: ddp; fsdp (every unit gathered again for each task's backward: FSDP's memory); fsdp-kept (units
#: kept gathered through a step's T backward passes: half the traffic of Gramian methods)
STRATEGIES = ("ddp", "fsdp", "fsdp-kept")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _engine(strategy: str, method, model, comm: Communicator) -> Engine:  # noqa: ANN001 - a Method
    common = {"last_shared_params": model.last_shared_parameters(), "comm": comm}
    if strategy.startswith("fsdp"):
        from torch.distributed.fsdp import FSDPModule

        kept = [m for m in model.modules() if isinstance(m, FSDPModule)] if strategy == "fsdp-kept" else []
        return ShardedEngine(method, model.shared_parameters(), sharded_params=model.parameters(),
                             reduce_params=list(method.parameters()), keep_gathered=kept, **common)
    return Engine(method, model.shared_parameters(), reduce_params=[*model.parameters(), *method.parameters()], **common)


def _worker(rank: int, world: int, port: int, encoder: str, task_counts: Sequence[int], methods: Sequence[str],
            strategies: Sequence[str], steps: int, warmup: int, queue) -> None:  # noqa: ANN001 - a multiprocessing queue
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = Communicator(rank, world)
    try:
        for n_tasks in task_counts:
            for strategy in strategies:
                problem = make_problem(encoder, n_tasks, torch.device("cpu"))
                model = shard_model(problem.model) if strategy.startswith("fsdp") else problem.model
                held = sum(local_shard(p).numel() for p in model.parameters())
                share = slice(rank, None, world)
                x, y = problem.x[share], problem.y[share]
                for name in methods:
                    method = example_method(name)
                    method.setup(problem.tasks, sizes={t: 1000 for t in problem.tasks})
                    try:
                        engine = _engine(strategy, method, model, comm)
                    except InvalidParameterError:  # FSDP refuses methods that need J itself
                        if rank == 0:
                            queue.put((encoder, n_tasks, name, METHODS.get(name).needs, strategy, None, None, held))
                        continue
                    times, sent = [], 0.0
                    for i in range(warmup + steps):
                        model.zero_grad(set_to_none=True)
                        dist.barrier()
                        begin = time.perf_counter()
                        with CollectiveCounter(world) as counter:
                            z = model.encode(x)
                            out = model.decode(z)
                            losses = {t: (out[t] - y[:, j]).pow(2).mean() for j, t in enumerate(problem.tasks)}
                            engine.backward(losses, features=[z])
                        if i >= warmup:
                            times.append((time.perf_counter() - begin) * 1000)
                            sent += counter.bytes
                    if rank == 0:
                        queue.put((encoder, n_tasks, name, METHODS.get(name).needs, strategy, statistics.median(times),
                                   sent / steps / 2**20, held))
    finally:
        dist.destroy_process_group()


def run(world: int, encoders: Sequence[str], task_counts: Sequence[int], methods: Sequence[str], *, steps: int = 5,
        warmup: int = 2, strategies: Sequence[str] = STRATEGIES, echo=print) -> list[tuple]:  # noqa: ANN001
    """Spawn ``world`` gloo processes per encoder and print one row per (T, method, strategy), then
    the FSDP/DDP ratios of bytes sent and of parameters held per rank."""
    ctx = mp.get_context("spawn")
    rows: list[tuple] = []
    echo(f"{'encoder':<6} {'T':>3} {'method':<14} {'needs':<9} {'strategy':<9} {'ms/step':>9} "
         f"{'MB sent/step/rank':>18} {'params/rank':>12}   ({world} ranks, gloo)")
    for encoder in encoders:
        queue = ctx.Queue()
        mp.start_processes(_worker, args=(world, _free_port(), encoder, list(task_counts), list(methods),
                                          list(strategies), steps, warmup, queue),
                           nprocs=world, join=True, start_method="spawn")
        while not queue.empty():
            row = queue.get()
            rows.append(row)
            timing = "refused" if row[5] is None else f"{row[5]:.1f}"
            sent = "—" if row[6] is None else f"{row[6]:.2f}"
            echo(f"{row[0]:<6} {row[1]:>3} {row[2]:<14} {row[3]:<9} {row[4]:<9} {timing:>9} {sent:>18} {row[7]:>12,}")
    by_key = {(r[0], r[1], r[2], r[4]): r for r in rows}
    pairs = [(by_key[(e, t, m, "ddp")], by_key[key]) for key in by_key for e, t, m, s in [key]
             if s != "ddp" and (e, t, m, "ddp") in by_key and by_key[key][6] is not None]
    if pairs:
        echo(f"\nper rank, to DDP: {'encoder':<6} {'T':>3} {'method':<14} {'strategy':<9} {'bytes sent':>10} "
             f"{'params held':>11} {'time':>6}")
        for ddp, other in pairs:
            echo(f"{'':<17} {ddp[0]:<6} {ddp[1]:>3} {ddp[2]:<14} {other[4]:<9} {other[6] / ddp[6]:>10.2f} "
                 f"{other[7] / ddp[7]:>11.2f} {other[5] / ddp[5]:>6.2f}")
    return rows
