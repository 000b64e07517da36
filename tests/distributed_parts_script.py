"""Run by `torchrun --nproc_per_node=2 tests/distributed_parts_script.py OUT`: under DDP (gloo), methods
that ask for parts of each batch (``Method.batch_parts``: MoDo, SDMGrad) or evaluate an outer
half-batch at displaced parameters (``Method.lookahead``: Auto-Lambda, MOML, FORUM, which also
evaluates the inner half) train a few steps;
rank 0 saves the parameters and the method's state for tests/test_distributed_parts.py to compare
with one process on the same global batches. Labels of task b are missing unevenly across ranks,
parts and halves, so each rank's share must be weighted by its own labelled counts."""

import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ddp_script import problem  # noqa: E402

METHODS = {"modo": {"gamma": 0.5}, "sdmgrad": {"n_iter": 5}, "auto_lambda": {"mode": "lookahead", "lr": 0.1},
           "moml": {"inner_lr": 0.05, "lr": 0.1}, "forum": {"inner_steps": 2, "lr": 0.1}}


def train(name: str, steps: int = 3) -> dict:
    import polytask as pt

    tasks, data = problem()
    torch.manual_seed(1)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 8]), tasks)
    trainer = pt.Trainer(model, tasks, method={"name": name, **METHODS[name]},
                         loop={"epochs": 1, "batch_size": 20, "steps_per_epoch": steps}, optim={"lr": 0.05},
                         run={"progress": False})
    trainer.fit(data)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state.update({f"method.{k}": v.clone() for k, v in trainer.method.state_dict().items() if isinstance(v, torch.Tensor)})
    return state


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = {name: train(name) for name in METHODS}
    if torch.distributed.get_rank() == 0:
        torch.save(results, sys.argv[1])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads must stop before exit, or a rank can abort
