"""`polytask bench overhead`: the Trainer's own cost per step over a hand-written PyTorch loop.

Both train the demo's model (UCI Adult, hard-sharing MLP 100 → 128 → 64, two binary heads,
Adam, batch 256, equal weights) on the same batches, with the same optimiser (the Trainer's
default, torch's fused Adam). A third loop is the hand-written one with torch's default Adam (on
the CPU its loop over the parameters), for what the Trainer's default optimiser saves.

The hand-written loop does what a careful user writes: slice the batch, forward, two BCE
losses, one backward of their sum, Adam step, keep the loss values and each task's predicted
probabilities, and at the epoch's end report
what the Trainer reports for the epoch: each task's mean loss and its train metrics (accuracy,
F1, AUROC), computed by the same metric objects the Trainer builds (``METRICS.build``, input
validation off as in the Trainer's tracker), so the comparison measures the loop, not two metric
implementations. The Trainer adds the engine, the health check, the step log and its callbacks.
Times are medians over interleaved repeats of whole epochs (the two loops alternate, so machine
noise hits both alike), per step; ``clock="cpu"`` times them by this process's CPU time instead
of the elapsed time, which on a machine shared with other processes is far steadier (with one intra-op thread it is the time the loops ran).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from polytask.datasets import load
from polytask.metrics.registry import METRICS
from polytask.models.encoders import MLP
from polytask.models.hard_sharing import HardSharing
from polytask.train.optim import build_optimizer


@dataclass
class Overhead:
    steps: int
    hand_ms: float
    trainer_ms: float
    #: the hand-written loop with torch's default Adam instead of the Trainer's (fused) one
    hand_default_ms: float | None = None
    #: each loop's epoch-end values of the last repeat, {task: {metric: value}} (the Trainer's train
    #: rows): the two loops train the same model on the same batches, so these agree to round-off
    hand_report: dict[str, dict[str, float]] = field(default_factory=dict)
    trainer_report: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        return self.trainer_ms / self.hand_ms


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def run(repeats: int = 5, batch_size: int = 256, threads: int = 1, echo: Callable[[str], None] = print,
        clock: str = "wall") -> Overhead:
    """``threads`` intra-op threads (1 by default: a small model gains nothing from a second
    thread, and one thread makes the ratio far less sensitive to other processes); ``clock``
    ``wall`` or ``cpu`` (see the module's docstring)."""
    from polytask.core.errors import InvalidParameterError
    from polytask.train.trainer import Trainer

    if clock not in CLOCKS:
        raise InvalidParameterError(f"`clock` must be one of {', '.join(CLOCKS)}; found {clock!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(Trainer, repeats, batch_size, echo, CLOCKS[clock])
    finally:
        torch.set_num_threads(before)


def _run(Trainer: type, repeats: int, batch_size: int, echo: Callable[[str], None],  # noqa: N803
         now: Callable[[], float] = time.perf_counter) -> Overhead:

    data = load("adult")
    train = data.train
    names = [t.name for t in data.tasks]

    def model() -> HardSharing:
        torch.manual_seed(0)
        return HardSharing(MLP(in_features=data.input_shape[0], hidden=[128, 64]), data.tasks)

    reports: dict[str, dict[str, dict[str, float]]] = {}

    def hand_epoch(default_adam: bool = False) -> tuple[float, int]:
        net = model()
        # the Trainer's optimiser (fused Adam where torch has it), or torch's own default
        optimizer = (torch.optim.Adam(net.parameters(), lr=1e-3) if default_adam else
                     build_optimizer("adam", [{"params": list(net.parameters())}], lr=1e-3))
        generator = torch.Generator().manual_seed(1)
        losses_seen: list[torch.Tensor] = []
        probabilities: dict[str, list[torch.Tensor]] = {t: [] for t in names}
        labels: dict[str, list[torch.Tensor]] = {t: [] for t in names}
        metrics = {t.name: METRICS.build(t) for t in data.tasks}  # built before the clock, as the Trainer's are
        for group in metrics.values():
            for metric in group.values():
                metric.validate_args = False
        start = now()
        steps = 0
        for batch in train.batches(batch_size, shuffle=True, generator=generator):
            out = net(batch.x)
            losses = [F.binary_cross_entropy_with_logits(out[t], batch.targets[t]) for t in names]
            optimizer.zero_grad(set_to_none=True)
            total = sum(losses)
            total.backward()
            optimizer.step()
            losses_seen.append(torch.stack(losses).detach())
            with torch.no_grad():
                for t in names:
                    probabilities[t].append(torch.sigmoid(out[t]))
                    labels[t].append(batch.targets[t])
            steps += 1
        # what a user logs at the epoch's end: mean losses and the train metrics of every task
        report = {t: {"loss": loss} for t, loss in zip(names, torch.stack(losses_seen).mean(0).tolist(), strict=True)}
        for t in names:
            p, y = torch.cat(probabilities[t]), torch.cat(labels[t]).long()
            for metric_name, metric in metrics[t].items():
                metric.update(p, y)
                report[t][metric_name] = float(metric.compute())
        seconds = now() - start
        if not default_adam:
            reports["hand"] = report
        return seconds, steps

    def trainer_epoch() -> tuple[float, int]:
        trainer = Trainer(model(), data.tasks, method="equal", loop={"epochs": 1, "batch_size": batch_size},
                          run={"progress": False})
        trainer.check(train)
        start = now()
        rows = trainer._train_epoch(train)  # the loop itself: no validation, no final evaluation
        seconds = now() - start
        report: dict[str, dict[str, float]] = {}
        for row in rows:
            report.setdefault(row["task"], {})[row["metric"]] = row["value"]
        reports["trainer"] = report
        return seconds, trainer.step_index

    hand_epoch(), trainer_epoch(), hand_epoch(default_adam=True)  # warm-up: thread pools, allocator, first calls
    hand, ours, default = [], [], []
    for _ in range(repeats):
        seconds, steps = hand_epoch()
        hand.append(seconds / steps)
        seconds, steps = trainer_epoch()
        ours.append(seconds / steps)
        seconds, steps = hand_epoch(default_adam=True)
        default.append(seconds / steps)
    result = Overhead(steps, statistics.median(hand) * 1000, statistics.median(ours) * 1000,
                      hand_default_ms=statistics.median(default) * 1000, hand_report=reports["hand"],
                      trainer_report=reports["trainer"])
    echo(f"Adult demo model, batch {batch_size}, {result.steps} steps per epoch, median of {repeats} interleaved epochs "
         f"({'CPU time' if now is time.process_time else 'elapsed time'})")
    echo(f"  hand-written loop  {result.hand_ms:7.3f} ms/step")
    echo(f"  polytask Trainer   {result.trainer_ms:7.3f} ms/step   ({result.ratio:.3f}×, "
         f"{(result.ratio - 1) * 100:+.1f}% overhead)")
    echo(f"  hand-written loop, torch's default Adam  {result.hand_default_ms:7.3f} ms/step   (the Trainer is "
         f"{result.trainer_ms / result.hand_default_ms:.3f}× it)")
    return result
