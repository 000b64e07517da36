"""The Trainer's option sections. Each is also a section of the YAML config (``train:``,
``optim:``, ``engine:``, ``health:``, ``run:``), validated once, here."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field, StrictBool, StrictInt, field_validator

from polytask.core.options import Options
from polytask.data.loader import check_mode
from polytask.engine.options import EngineOptions
from polytask.train.health import HealthOptions

PositiveInt = Annotated[StrictInt, Field(ge=1)]

_MOVED_FROM_TRAIN = {
    **{k: f"`optim.{k}`" for k in ("lr", "optimizer", "weight_decay", "momentum", "scheduler", "clip")},
    **{k: f"`run.{k}`" for k in ("device", "precision", "progress")},
    "engine": "the top-level section `engine:`", "health": "the top-level section `health:`",
}


class LoopOptions(Options):
    """How long and in what steps training runs, and what picks the best epoch (YAML ``train:``).

    Attributes:
        epochs, batch_size: the usual (whole numbers: ``true`` or ``"16"`` are refused).
        steps_per_epoch: fixed number of steps per epoch (default: from the data sizes).
        loader_mode: how an epoch walks per-task data sets (``polytask.data.loader.LOADER_MODES``).
        monitor: what picks the best epoch and drives early stopping: ``loss`` (mean validation
            loss over tasks), ``TASK/METRIC`` or ``delta_m`` (needs ``baselines``).
        patience: epochs without improvement before stopping (None: never stop early).
        checkpoint_every: also write checkpoints/last.pt every N steps inside an epoch, so a
            killed run resumes mid-epoch exactly (default: at epoch ends only).
    """

    moved: ClassVar = _MOVED_FROM_TRAIN

    epochs: PositiveInt = 10
    batch_size: PositiveInt = 256
    steps_per_epoch: PositiveInt | None = None
    loader_mode: str = "sample"
    monitor: str = "loss"
    patience: PositiveInt | None = None
    checkpoint_every: PositiveInt | None = None

    @field_validator("loader_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        check_mode(value)
        return value


class ClipOptions(Options):
    """Gradient clipping: ``norm`` (max global norm), ``value`` (max absolute value) and
    ``per_task`` (max norm of each task's gradient on θ, before aggregation)."""

    norm: float | None = Field(None, gt=0)
    value: float | None = Field(None, gt=0)
    per_task: float | None = Field(None, gt=0)


class OptimOptions(Options):
    """The optimiser (YAML ``optim:``): adam | adamw | sgd, and a per-epoch learning-rate schedule
    none | cosine | step | exponential. Tasks may set their own ``lr`` / ``weight_decay``.

    ``fused``: torch's fused kernel for the optimiser step (one kernel for all parameters). ``null``
    (the default) takes it where torch has it for the parameters (floating tensors on the CPU or a
    GPU, not sharded by FSDP) and torch's default implementation elsewhere; ``true`` or ``false``
    decide. On the demo model the fused Adam step made a whole training step 22% faster on the CPU
    (torch's CPU default is the loop over parameters). The two round differently: a run and its
    resume take the same one."""

    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0)
    fused: bool | None = None
    scheduler: Literal["none", "cosine", "step", "exponential"] = "none"
    clip: ClipOptions = Field(default_factory=ClipOptions)


class RunOptions(Options):
    """Where and how the run executes (YAML ``run:``).

    Attributes:
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when present; under torchrun each
            rank takes its LOCAL_RANK GPU).
        precision: ``32``, ``bf16`` (autocast; CPU or GPU) or ``16`` (fp16 autocast with a
            gradient scaler; GPU).
        progress: progress bars and one console line per epoch.
        distributed: how the ranks share the work under torchrun (ignored in one process):
            ``ddp`` (every rank holds the whole model; the engine all-reduces losses, J or the
            gradients) or ``fsdp`` (torch FSDP2: every rank holds 1/W of each parameter, its
            gradient and optimiser state; Gramian methods sum the ranks' T×T Gramian blocks).
            See docs/distributed.md.
    """

    device: str = "cpu"
    precision: Literal["32", "bf16", "16"] = "32"
    progress: StrictBool = True
    distributed: Literal["ddp", "fsdp"] = "ddp"


__all__ = ["ClipOptions", "EngineOptions", "HealthOptions", "LoopOptions", "OptimOptions", "RunOptions"]
