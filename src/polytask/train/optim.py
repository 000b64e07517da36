"""Optimizer with per-task parameter groups, and learning-rate schedules."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from polytask.core.errors import InvalidParameterError, closest
from polytask.core.task import Task
from polytask.models.base import MultiTaskModel

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULERS = ("none", "cosine", "step", "exponential")


def parameter_groups(model: MultiTaskModel, tasks: Sequence[Task], extra: Iterable[nn.Parameter], *, lr: float,
                     weight_decay: float) -> list[dict]:
    """Shared parameters, and the private parameters of tasks without settings of their own, at
    the global settings; each task that sets its own ``lr`` / ``weight_decay`` gets a group of its
    private parameters (``task:NAME``); method parameters (e.g. uncertainty log-variances) at the
    global learning rate without decay; a submodule with an ``own_lr`` attribute gets a group
    (``module:NAME``) at that rate. (One group per task would cost an optimiser call per task
    per step: on small models more than the update itself.)"""
    groups, seen = [], set()
    for name, module in model.named_modules():  # a module with its own rate (e.g. a fine-tuned pretrained encoder)
        own = getattr(module, "own_lr", None)
        params = [p for p in module.parameters() if p.requires_grad and id(p) not in seen] if own is not None else []
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "name": f"module:{name}", "lr": float(own), "weight_decay": weight_decay})
    for task in tasks:
        if task.lr is None and task.weight_decay is None:
            continue
        params = [p for p in model.task_parameters(task.name) if p.requires_grad and id(p) not in seen]
        seen.update(id(p) for p in params)
        if params:
            groups.append({"params": params, "name": f"task:{task.name}",
                           "lr": task.lr if task.lr is not None else lr,
                           "weight_decay": task.weight_decay if task.weight_decay is not None else weight_decay})
    shared = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups.insert(0, {"params": shared, "name": "shared", "lr": lr, "weight_decay": weight_decay})
    method_params = [p for p in extra if p.requires_grad]
    if method_params:
        groups.append({"params": method_params, "name": "method", "lr": lr, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def build_optimizer(name: str, groups: list[dict], *, lr: float, momentum: float = 0.9,
                    fused: bool | None = None) -> torch.optim.Optimizer:
    """``name``'s torch optimiser over ``groups``; ``fused`` None: its fused kernel where torch has
    one for these parameters (:func:`fusable`) and it takes parameters that start late (not SGD with
    momentum), torch's default implementation elsewhere."""
    if name not in OPTIMIZERS:
        raise InvalidParameterError(f"unknown optimizer '{name}'.{closest(name, OPTIMIZERS)} Valid: {', '.join(OPTIMIZERS)}")
    if fused is None:
        # not SGD with momentum: torch's fused SGD fails (TypeError) when a parameter gets its first
        # gradient after a step that skipped it (a head whose task's first labels come late), as
        # torch 2.13's kernel expects a momentum buffer for every parameter with a gradient
        fused = fusable([p for group in groups for p in group["params"]]) and not (name == "sgd" and momentum)
    kind = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[name]
    extra = {"momentum": momentum} if name == "sgd" else {}
    # fused=None, not False, when not fused: torch then picks its own default (foreach on a GPU)
    return kind(groups, lr=lr, fused=True if fused else None, **extra)


def fusable(params: Sequence[torch.Tensor]) -> bool:
    """Whether torch's fused optimiser kernels take ``params``: plain floating tensors (not FSDP's
    sharded DTensors), all on the CPU or all on CUDA devices."""
    if not params:
        return False
    kinds = {p.device.type for p in params}
    return (kinds in ({"cpu"}, {"cuda"}) and all(type(p.data) is torch.Tensor and p.is_floating_point() for p in params))


def build_scheduler(name: str, optimizer: torch.optim.Optimizer, *, epochs: int, step_size: int = 10,
                    gamma: float = 0.5) -> torch.optim.lr_scheduler.LRScheduler | None:
    """Per-epoch schedule: cosine annealing to 0 over ``epochs``, step decay or exponential decay."""
    if name == "none":
        return None
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs))
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step_size, gamma=gamma)
    if name == "exponential":
        return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=gamma)
    raise InvalidParameterError(f"unknown scheduler '{name}'.{closest(name, SCHEDULERS)} Valid: {', '.join(SCHEDULERS)}")
