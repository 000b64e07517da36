"""Run by `torchrun --nproc_per_node=1 tests/cuda_nccl_script.py OUT` on a CUDA machine.

It joins a one-rank NCCL process group before the Trainer is built, so the Trainer takes its
collective path on CUDA tensors (task losses, Gramians, the update and broadcast objects all
cross NCCL), trains ddp_script's methods and saves the parameters; tests/test_cuda.py compares
them with the same runs in a process that has no process group. One GPU cannot hold two NCCL
ranks (NCCL refuses a duplicate device), so this is the most of NCCL one GPU can exercise.
"""

import sys

import torch
import torch.distributed as dist

from ddp_script import METHODS, train

if __name__ == "__main__":
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    results = {}
    for name in METHODS:
        state, trainer = train(name, device="cuda")
        if trainer.comm is None or trainer.device.type != "cuda":
            raise SystemExit(f"{name}: the Trainer did not take the collective path on CUDA "
                             f"(comm {trainer.comm}, device {trainer.device})")
        results[name] = {k: v.cpu() for k, v in state.items()}
        results[f"{name}:bytes"] = torch.tensor(trainer.comm.bytes)
    torch.save(results, sys.argv[1])
    dist.barrier()
    dist.destroy_process_group()
