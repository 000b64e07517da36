"""Run by `torchrun --nproc_per_node=2 tests/ddp_script.py OUT`: trains a few steps with each method
under DDP (gloo) and rank 0 saves the parameters, for tests/test_distributed.py to compare with
one process on the same global batches."""

import sys

import torch

from polytask.data import MultiOutputDataset
from polytask.engine.comm import Communicator

#: ":rare": task b labelled on 6 rows of 96, trained with Adam (a head no rank has a gradient for must
#: keep grad None, or Adam moves it); ":uneven": 97 rows in batches of 32, so the last batch has one row
#: and one rank none (its mean loss was NaN)
METHODS = ["equal", "uncertainty", "pcgrad", "mgda", "nash_mtl", "equal:rare", "upgrad:rare", "upgrad:uneven",
           "pcgrad:hooks", "uncertainty:hooks"]
#: ":hooks": every parameter has a post-accumulate-grad hook (see watch_hooks), which changes nothing


def watch_hooks(trainer) -> list[list[float]]:
    """Give every parameter of the trainer's model a post-accumulate-grad hook that keeps a copy of
    the gradient it sees, and check before each optimiser step that each parameter with a gradient
    had its hook run once, seeing that gradient (this rank's shard under FSDP), and that the others
    had none. Returns, per step, [parameters whose hook ran as it should, all parameters, the largest
    difference between a hook's gradient and the stepped one]: a rank records, the test asserts
    (a rank that raised would leave the other waiting in a collective)."""
    from polytask.engine.sharded import local_shard

    params = list(trainer.model.parameters())
    seen: dict[int, list] = {}
    log: list[list[float]] = []
    for k, p in enumerate(params):
        def hook(tensor, k=k):
            seen.setdefault(k, []).append(local_shard(tensor.grad).clone())
        p.register_post_accumulate_grad_hook(hook)
    step = trainer._optimizer_step

    def checked():
        right, worst = 0, 0.0
        for k, p in enumerate(params):
            got = seen.get(k, [])
            if p.grad is None:
                right += not got
            elif len(got) == 1:
                right += 1
                if got[0].numel():  # a rank's shard of a small tensor may be empty
                    worst = max(worst, (got[0] - local_shard(p.grad)).abs().max().item())
        log.append([right, len(params), worst])
        seen.clear()
        step()

    trainer._optimizer_step = checked
    return log


def problem(seed: int = 0, rare: bool = False, rows: int = 96):
    """Three tasks on ``rows`` rows; task b labelled on ~70% of them, or (``rare``) on ~6%, so that
    most steps have no b label on any rank."""
    import polytask as pt

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 6, generator=g)
    targets = {"a": x[:, 0] * 2 + 0.1 * torch.randn(rows, generator=g), "b": (x[:, 1] > 0).float(),
               "c": (x[:, 2] > x[:, 3]).long() + (x[:, 4] > 0).long()}
    labelled = torch.rand(rows, generator=g)
    masks = {"b": labelled < 0.06 if rare else labelled > 0.3}  # missing labels, unevenly spread over ranks
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary"), pt.Task("c", kind="multiclass", num_classes=3)]
    return tasks, MultiOutputDataset(x, targets, masks)


def train(name: str, steps: int = 4, device: str = "cpu"):
    import polytask as pt

    method, rare, uneven = name.split(":")[0], name.endswith(":rare"), name.endswith(":uneven")
    tasks, data = problem(rare=rare, rows=97 if uneven else 96)
    torch.manual_seed(1)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 8]), tasks)
    loop = ({"epochs": 1, "batch_size": 8} if rare else {"epochs": 1, "batch_size": 32} if uneven
            else {"epochs": 1, "batch_size": 20, "steps_per_epoch": steps})
    optim = {"optimizer": "adam", "lr": 0.01} if rare else {"lr": 0.05}
    trainer = pt.Trainer(model, tasks, method=method, loop=loop, optim=optim, run={"progress": False, "device": device})
    trainer.hook_log = watch_hooks(trainer) if name.endswith(":hooks") else None
    trainer.fit(data)
    return {k: v.clone() for k, v in model.state_dict().items()}, trainer


def grads_averaged_in_place(comm: Communicator) -> dict[str, torch.Tensor]:
    """``mean_grads_`` on a float32 weight with a gradient held by the caller, a float64 bias and a
    channels-last convolution weight that has no gradient on rank 1: the held tensor is kept (the
    mean written into it), each gradient has its parameter's dtype and the new one its layout."""
    torch.manual_seed(0)
    weight, bias = torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3).to(memory_format=torch.channels_last))
    rank = comm.rank
    weight.grad = torch.full((3, 2), float(rank + 1))
    bias.grad = torch.full((3,), 0.5 * (rank + 1), dtype=torch.float64)
    conv.grad = torch.ones_like(conv) if rank == 0 else None
    held = weight.grad
    comm.mean_grads_([weight, bias, conv])
    return {"kept": torch.tensor(weight.grad is held), "weight": weight.grad.clone(), "bias": bias.grad.clone(),
            "bias_dtype_ok": torch.tensor(bias.grad.dtype == torch.float64),
            "conv_strides_ok": torch.tensor(conv.grad.stride() == conv.stride()), "conv": conv.grad.clone()}


def log_variances_left_out(comm: Communicator) -> dict[str, torch.Tensor]:
    """The Engine used directly, its method's log-variances left out of ``reduce_params``: every rank's
    log-variances after 20 steps on its own data (they drifted apart on ``update``'s route, which
    back-propagates the rank's own losses into them), stacked by rank."""
    from polytask.engine.backward import Engine
    from polytask.methods.uncertainty import Uncertainty

    class Differentiable(Uncertainty):
        def host_update(self, step):  # declined: the engine takes update()'s backward
            return None

    out = {}
    for cls in (Uncertainty, Differentiable):
        method = cls()
        method.setup(("a", "b"))
        w = torch.nn.Parameter(torch.tensor([0.5, -0.5]))
        engine = Engine(method, [w], comm=comm, reduce_params=[w])
        opt = torch.optim.SGD([w, *method.parameters()], lr=0.1)
        g = torch.Generator().manual_seed(comm.rank)
        for _ in range(20):
            opt.zero_grad()
            y = torch.randn(2, generator=g) * (1 + comm.rank)
            engine.backward({"a": (w[0] - y[0]) ** 2, "b": (w[1] - y[1]) ** 2})
            opt.step()
        ranks = [torch.zeros(2) for _ in range(comm.world_size)]
        torch.distributed.all_gather(ranks, method.log_vars.detach().clone())
        out[f"log_vars:{cls.__name__}"] = torch.stack(ranks)
    return out


def labels_on_one_rank() -> dict:
    """``evaluate`` on data whose task b is labelled on even rows only: under 2 ranks (strided shards)
    every b label is on rank 0. The rank without labels skipped the metrics' compute, a collective,
    and the other waited for good; then torchmetrics' empty float32 lists aborted gloo."""
    import polytask as pt

    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g)
    data = MultiOutputDataset(x, {"a": x[:, 0], "b": (x[:, 1] > 0).float()}, {"b": torch.arange(64) % 2 == 0})
    tasks = [pt.Task("a", kind="regression"), pt.Task("b", kind="binary")]
    torch.manual_seed(1)
    model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[8]), tasks)
    trainer = pt.Trainer(model, tasks, method="equal", loop={"epochs": 1, "batch_size": 64}, run={"progress": False})
    return trainer.evaluate(data)


class _Stop(Exception):
    pass


def dwa_resumed_mid_epoch(folder) -> dict[str, torch.Tensor]:
    """DWA for 2 epochs checkpointed every 2 steps, cut after step 3 and resumed: its history (the
    epochs' mean training losses) and parameters. Under DDP the checkpoint held rank 0's share of the
    epoch's losses only, so the resumed history was off (2.06 against 2.44)."""
    from pathlib import Path

    import polytask as pt
    from polytask.train.callbacks import Callback

    class Cut(Callback):
        def on_step_end(self, trainer, step):
            if trainer.step_index == 3:
                raise _Stop

    def trainer(resume: bool, callbacks=()):
        tasks, data = problem()
        torch.manual_seed(1)
        model = pt.models.HardSharing(pt.encoders.MLP(in_features=6, hidden=[16, 8]), tasks)
        return pt.Trainer(model, tasks, method="dwa", loop={"epochs": 2, "batch_size": 20, "checkpoint_every": 2},
                          optim={"lr": 0.05}, run={"progress": False}, output_dir=Path(folder), resume=resume,
                          overwrite=not resume, callbacks=list(callbacks)), data

    first, data = trainer(False, [Cut()])
    try:
        first.fit(data)
    except _Stop:
        pass
    second, data = trainer(True)
    second.fit(data)
    return {"history": second.method.history.clone(),
            **{f"model:{k}": v.clone() for k, v in second.model_state_dict().items()}}


if __name__ == "__main__":
    torch.set_num_threads(1)
    results = {}
    for name in METHODS:
        state, trainer = train(name)
        results[name] = state
        results[f"{name}:bytes"] = torch.tensor(trainer.comm.bytes if trainer.comm is not None else 0)
        if trainer.hook_log is not None:
            results[f"{name}:hooks"] = torch.tensor(trainer.hook_log)
    comm = Communicator.from_env(torch.device("cpu"))
    if comm is not None:
        results.update(log_variances_left_out(comm))
        results["in_place"] = grads_averaged_in_place(comm)
        every_rank: list = [None] * comm.world_size
        torch.distributed.all_gather_object(every_rank, labels_on_one_rank())
        results["evaluate:labels_on_one_rank"] = every_rank
        from pathlib import Path

        results["dwa:resumed"] = dwa_resumed_mid_epoch(Path(sys.argv[1]).parent / "resumed")
    if comm is None or comm.is_main:
        torch.save(results, sys.argv[1])
    if torch.distributed.is_initialized():  # gloo's threads must stop before exit, or a rank can abort at shutdown
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
