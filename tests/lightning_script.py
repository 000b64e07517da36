"""A Lightning run of MultiTaskModule on fixed data, for tests/test_lightning.py.

python tests/lightning_script.py OUT_DIR DEVICES METHOD [PRECISION [ACCELERATOR]]: trains 2 epochs on 128
rows (global batch 32: 32 / DEVICES per process; the same global batches in both cases)
and rank 0 writes OUT_DIR/params.pt (the final parameters) and the logger's metrics.csv.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import polytask as pt
from polytask.integrations.lightning import MultiTaskModule


class Rows(Dataset):
    def __init__(self, n: int = 128) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 6, generator=g)
        self.a = self.x[:, 0] * 2 + 0.1 * torch.randn(n, generator=g)
        self.b = (self.x[:, 1] > 0).float()
        self.known = torch.arange(n) % 4 != 0 if not os.environ.get("ALL_LABELS") else torch.ones(n, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {"a": self.a[i], "b": self.b[i]}, {"b": self.known[i]}


def main(out: Path, devices: int, method: str, precision: str = "32-true", accelerator: str = "cpu") -> None:
    torch.manual_seed(0)
    tasks = [pt.Task("a", "regression"), pt.Task("b", "binary")]
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 16]), tasks)
    module = MultiTaskModule(model, method=method, optim={"optimizer": "sgd", "lr": 0.05, "momentum": 0.0,
                                                          "clip": {"norm": 5.0}})
    logger = pl.loggers.CSVLogger(str(out), name="logs", version=0)
    trainer = pl.Trainer(max_epochs=2, accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
                         precision=precision, logger=logger, enable_checkpointing=True, default_root_dir=str(out),
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                         use_distributed_sampler=True)
    # Under DDP Lightning puts a DistributedSampler (shuffled, seed 0) in: rank r gets rows perm[r::world], so
    # step k's batches together are perm[32k:32k + 32]; one process reads the same permutation in order
    rows = Rows()
    if devices == 1:
        loader = DataLoader(rows, batch_size=32, sampler=DistributedSampler(rows, num_replicas=1, rank=0, seed=0))
    else:
        loader = DataLoader(rows, batch_size=32 // devices, shuffle=True)
    trainer.fit(module, loader, DataLoader(Rows(64), batch_size=64 // devices))
    if trainer.is_global_zero:
        torch.save({k: v.detach().clone() for k, v in module.model.state_dict().items()}, out / "params.pt")
        torch.save(module.engine.state_dict(), out / "engine.pt")
    if devices > 1:
        epoch_sums(module, trainer, out)


def epoch_sums(module: MultiTaskModule, trainer: pl.Trainer, out: Path) -> None:
    """Each rank with its own share of an epoch's training losses (rank 1's tasks in the other order:
    a rank's dict holds a task from its first labelled batch on): what the end-of-epoch hook hands the
    method, what a checkpoint holds and what each rank takes back from it, gathered to OUT/epoch.pt."""
    rank = trainer.global_rank
    shares = {0: ({"a": 6.0, "b": 1.5}, {"a": 64, "b": 48}), 1: ({"b": 0.5, "a": 2.0}, {"b": 16, "a": 64})}
    module._epoch_loss, module._epoch_count = (dict(d) for d in shares[rank])
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    module.on_load_checkpoint(checkpoint)
    resumed = (dict(module._epoch_loss), dict(module._epoch_count))
    seen: list = []
    module.method.on_epoch_end = lambda epoch, train, val: seen.append(dict(train))
    module.on_train_epoch_end()
    every_rank: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(every_rank, {"saved": checkpoint["polytask_epoch"], "resumed": resumed,
                                                     "hook": seen[0]})
    if rank == 0:
        torch.save(every_rank, out / "epoch.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], *sys.argv[4:6])
