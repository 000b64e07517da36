"""`polytask bench speed --ddp N`: step time and communication volume per method with N CPU
processes (gloo) on the benchmark problem; each rank takes its share of the global batch."""

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
from polytask.engine.backward import Engine
from polytask.engine.comm import Communicator
from polytask.methods.base import METHODS, example_method


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, encoder: str, task_counts: Sequence[int], methods: Sequence[str],
            steps: int, warmup: int, queue) -> None:  # noqa: ANN001 - a multiprocessing queue
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    comm = Communicator(rank, world)
    try:
        for n_tasks in task_counts:
            problem = make_problem(encoder, n_tasks, torch.device("cpu"))
            share = slice(rank, None, world)
            x, y = problem.x[share], problem.y[share]
            for name in methods:
                method = example_method(name)
                method.setup(problem.tasks, sizes={t: 1000 for t in problem.tasks})
                model = problem.model
                engine = Engine(method, model.shared_parameters(), last_shared_params=model.last_shared_parameters(),
                                comm=comm, reduce_params=[*model.parameters(), *method.parameters()])
                times, start_bytes = [], 0
                for i in range(warmup + steps):
                    if i == warmup:
                        start_bytes = comm.bytes
                    model.zero_grad(set_to_none=True)
                    dist.barrier()
                    begin = time.perf_counter()
                    z = model.encode(x)
                    out = model.decode(z)
                    losses = {t: (out[t] - y[:, j]).pow(2).mean() for j, t in enumerate(problem.tasks)}
                    engine.backward(losses, features=[z])
                    if i >= warmup:
                        times.append((time.perf_counter() - begin) * 1000)
                if rank == 0:
                    queue.put((encoder, n_tasks, name, METHODS.get(name).needs, statistics.median(times),
                               (comm.bytes - start_bytes) / steps / 2**20))
    finally:
        dist.destroy_process_group()


def run(world: int, encoders: Sequence[str], task_counts: Sequence[int], methods: Sequence[str], *, steps: int = 5,
        warmup: int = 2, echo=print) -> list[tuple]:  # noqa: ANN001
    """Spawn ``world`` gloo processes per encoder and print one row per (T, method)."""
    ctx = mp.get_context("spawn")
    rows: list[tuple] = []
    echo(f"{'encoder':<6} {'T':>3} {'method':<14} {'needs':<9} {'ms/step':>9} {'MB sent/step/rank':>18}   ({world} ranks, gloo)")
    for encoder in encoders:
        queue = ctx.Queue()
        mp.start_processes(_worker, args=(world, _free_port(), encoder, list(task_counts), list(methods), steps, warmup,
                                          queue), nprocs=world, join=True, start_method="spawn")
        while not queue.empty():
            row = queue.get()
            rows.append(row)
            echo(f"{row[0]:<6} {row[1]:>3} {row[2]:<14} {row[3]:<9} {row[4]:>9.1f} {row[5]:>18.2f}")
    return rows
