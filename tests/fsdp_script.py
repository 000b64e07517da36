"""Run by `torchrun --nproc_per_node=2 tests/fsdp_script.py OUT`: trains a few steps with each method
under run.distributed: fsdp (gloo), and the Gramian method under ddp as well, counting every
collective's bytes; rank 0 saves the gathered parameters for tests/test_fsdp.py to compare with
one process on the same global batches."""

import sys
from pathlib import Path

import torch

from polytask.engine.comm import CollectiveCounter
from polytask.engine.sharded import local_shard

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from ddp_script import problem, watch_hooks  # noqa: E402

#: method → engine options: a loss method with learnable weights, the Gramian method (upgrad), a
#: features-mode method (mgda_ub), one on the last shared layer with learnable weights (gradnorm),
#: one with two batch parts (modo), per-task clipping on a loss method (its J is taken) and upgrad with
#: the FSDP units kept gathered through the per-task backward passes (ShardedEngine.keep_gathered), and
#: upgrad on the last shared layer with unweighted heads (the layers below get Σ wᵢ∇Lᵢ, the heads Σ ∇Lᵢ)
METHODS = {"equal": {}, "uncertainty": {}, "upgrad": {}, "mgda_ub": {}, "gradnorm": {}, "modo": {},
           "equal:clip": {}, "upgrad:kept": {}, "upgrad:last": {"compare": "last_shared"}, "upgrad:rare": {},
           "upgrad:hooks": {}, "upgrad:cross_stitch": {}}
#: ":rare": task b labelled on 6 rows of 96, with Adam: a head no task reached keeps grad None; ":hooks":
#: every parameter has a post-accumulate-grad hook (ddp_script.watch_hooks); ":cross_stitch": that model, whose
#: mixing weights (an nn.ParameterList) are read in the model's encode
STEPS = 3


def build(name: str, distributed: str = "ddp", steps: int = STEPS, epochs: int = 1, **kwargs):
    import polytask as pt

    method, rare = name.split(":")[0], name.endswith(":rare")
    tasks, data = problem(rare=rare)
    torch.manual_seed(1)
    if name.endswith(":cross_stitch"):
        model = pt.models.CrossStitch(lambda: pt.encoders.MLP(in_features=6, hidden=[16, 8]), tasks)
    else:
        model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 8]), tasks)
    clip = {"per_task": 0.5} if name.endswith(":clip") else {}
    loop = ({"epochs": epochs, "batch_size": 8} if rare else
            {"epochs": epochs, "batch_size": 20, "steps_per_epoch": steps})
    optim = {"optimizer": "adam", "lr": 0.01} if rare else {"lr": 0.05, "clip": clip}
    return pt.Trainer(model, tasks, method=method, loop=loop, optim=optim, engine=METHODS.get(name, {}),
                      run={"progress": False, "distributed": distributed}, **kwargs), data


def gathered(model) -> int:
    """How many of the model's FSDP units hold their parameters gathered (unsharded) now."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState

    count = 0
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if isinstance(module, FSDPModule) else None
        count += group is not None and any(p.sharded_state != ShardedState.SHARDED for p in group.fsdp_params)
    return count


def watch_gathered(trainer) -> list[int]:
    """The units left gathered at each optimiser step (a head no task's loss reached stayed so)."""
    log: list[int] = []
    step = trainer._optimizer_step

    def checked():
        log.append(gathered(trainer.model))
        step()

    trainer._optimizer_step = checked
    return log


def train(name: str, distributed: str = "ddp", steps: int = STEPS):
    trainer, data = build(name, distributed, steps)
    trainer.gathered_log = watch_gathered(trainer) if distributed == "fsdp" else None
    trainer.data = data
    if name.endswith(":kept") and trainer.sharded:
        from torch.distributed.fsdp import FSDPModule

        trainer.engine.keep_gathered = [m for m in trainer.model.modules() if isinstance(m, FSDPModule)]
    trainer.hook_log = watch_hooks(trainer) if name.endswith(":hooks") else None
    world = trainer.comm.world_size if trainer.comm is not None else 1
    with CollectiveCounter(world) as counter:
        trainer.fit(data)
    state = {k: v.clone() for k, v in trainer.model_state_dict().items()}
    local = sum(local_shard(p).numel() for p in trainer.model.parameters())
    return state, counter, local, trainer


def resumed(folder: Path, distributed: str = "ddp") -> dict:
    """upgrad for 2 epochs with checkpoints, then resumed from last.pt for a third: the final state."""
    first, data = build("upgrad", distributed, steps=2, epochs=2, output_dir=folder)
    first.fit(data)
    second, data = build("upgrad", distributed, steps=2, epochs=3, output_dir=folder, resume=True)
    second.fit(data)
    return {k: v.clone() for k, v in second.model_state_dict().items()}


if __name__ == "__main__":
    torch.set_num_threads(1)
    results: dict = {}
    for name in METHODS:
        state, counter, local, trainer = train(name, "fsdp")
        results[name] = state
        results[f"{name}:by_op"] = {k: torch.tensor(v) for k, v in counter.by_op.items()}
        results[f"{name}:local"] = torch.tensor(local)
        if name.endswith(":hooks"):
            results[f"{name}:hook_log"] = torch.tensor(trainer.hook_log)
        trainer.evaluate(trainer.data)  # a forward without backward
        results[f"{name}:gathered"] = torch.tensor([*trainer.gathered_log, gathered(trainer.model)])
    _, counter, _, _ = train("upgrad", "ddp")
    results["upgrad:ddp:by_op"] = {k: torch.tensor(v) for k, v in counter.by_op.items()}
    results["resumed"] = resumed(Path(sys.argv[1]).parent / "run", "fsdp")
    if torch.distributed.get_rank() == 0:
        torch.save(results, sys.argv[1])
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # gloo's threads must stop before exit, or a rank can abort
