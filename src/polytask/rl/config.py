"""The YAML configuration of ``polytask rl train``: one validated schema, unknown keys refused.

```yaml
seed: 0
output_dir: runs/rl_pendulum
env: {name: pendulum}                 # a family of polytask.rl.envs.registry, with its options
encoder: {name: care, experts: 4}     # shared_mlp | onehot_mlp | per_task_heads | care
context: descriptions                 # CARE: learned | descriptions | a .json (task → vector) or .npy (T, d) file
method: pcgrad                        # any `polytask list methods` name, or {name: …, **params}
engine: {compare: auto}               # polytask.Engine options (both engines)
sac: {batch_size: 128, discount: 0.99, …}
train: {steps: 20000, eval_every: 2000, eval_episodes: 2, checkpoint_every: 2000}
```
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, StrictBool, StrictInt, ValidationError, field_validator, model_validator

from polytask.config.schema import Named, Strict, format_errors, named, read_raw
from polytask.core.errors import ConfigError
from polytask.core.options import Options
from polytask.engine.options import EngineOptions

PositiveInt = Annotated[StrictInt, Field(ge=1)]

#: engine options whose ``auto`` depends on the moment: ``jacobian`` times loop against batched on
#: the first steps, ``gramian`` weighs J against the free memory at the first step. A run and its
#: resumed copy (or two runs of one seed) could then take different routes and differ in the last
#: bits, which a gradient method such as PCGrad's sign tests turns into different runs. RL runs
#: fix them unless the config names them.
REPRODUCIBLE_ENGINE: dict[str, str] = {k: v for k, v in {"jacobian": "loop", "gramian": "jacobian"}.items()
                                       if k in EngineOptions.model_fields}


class SACOptions(Options):
    """Soft actor-critic hyper-parameters (YAML ``sac:``); defaults from mtrl's Meta-World agent.

    Attributes:
        discount: γ. tau: the Polyak rate of the target critic.
        batch_size: transitions drawn per task per update (the minibatch is T × batch_size).
        buffer_size: transitions kept per task.
        hidden: the trunk widths of the actor and of each Q network (after the encoder).
        actor_lr, critic_lr, alpha_lr: Adam learning rates; init_alpha: α_τ at the start.
        actor_update_every, target_update_every: in updates.
        random_steps: environment steps with uniform random actions before the policy acts.
        update_after: environment steps before the first update.
        updates_per_step: gradient updates per environment step (of all tasks together).
        log_std_bounds: [min, max] of the actor's log σ.
        grad_clip: max global gradient norm of each network's update (None: no clipping).
    """

    discount: float = Field(0.99, ge=0, le=1)
    tau: float = Field(0.005, gt=0, le=1)
    batch_size: PositiveInt = 128
    buffer_size: PositiveInt = 1_000_000
    hidden: list[PositiveInt] = Field(default_factory=lambda: [400, 400, 400])
    actor_lr: float = Field(3e-4, gt=0)
    critic_lr: float = Field(3e-4, gt=0)
    alpha_lr: float = Field(3e-4, gt=0)
    init_alpha: float = Field(1.0, gt=0)
    actor_update_every: PositiveInt = 1
    target_update_every: PositiveInt = 1
    random_steps: StrictInt = Field(1000, ge=0)
    update_after: StrictInt = Field(1000, ge=0)
    updates_per_step: PositiveInt = 1
    log_std_bounds: tuple[float, float] = (-10.0, 2.0)
    grad_clip: float | None = Field(None, gt=0)

    @field_validator("log_std_bounds")
    @classmethod
    def _ordered(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not value[0] < value[1]:
            raise ValueError(f"log_std_bounds must be [min, max] with min < max; found {list(value)}")
        return value


class RLLoopOptions(Options):
    """How long the run collects and when it evaluates and checkpoints (YAML ``train:``).

    All cadences are in environment steps of the lockstep family (one step = one transition of
    every task) and must be multiples of the family's episode length, so that evaluation and
    checkpoints fall on episode boundaries (where a run resumes exactly).

    Attributes:
        steps: the budget of environment steps.
        eval_every: evaluate (deterministic policy, a separate copy of the family) every N steps.
        eval_episodes: episodes per task per evaluation.
        checkpoint_every: write checkpoints/last.pt every N steps (and at the end).
        progress: a progress bar and a console line per evaluation.
    """

    steps: PositiveInt = 20_000
    eval_every: PositiveInt = 2_000
    eval_episodes: PositiveInt = 2
    checkpoint_every: PositiveInt = 2_000
    progress: StrictBool = True


class RLConfig(Strict):
    seed: StrictInt = 0
    output_dir: Path = Path("runs/rl")
    env: Named
    encoder: Named = Field(default_factory=lambda: Named(name="shared_mlp"))
    # CARE's task contexts: learned vectors, the family's task descriptions embedded offline
    # (polytask.rl.context), or a file holding a (T, d) array
    context: str = "learned"
    method: Named = Field(default_factory=lambda: Named(name="equal"))
    # the engines' options; the timed `auto` choices default to fixed ones here (see REPRODUCIBLE_ENGINE)
    engine: EngineOptions = Field(default_factory=lambda: EngineOptions(**REPRODUCIBLE_ENGINE))
    sac: SACOptions = Field(default_factory=SACOptions)
    train: RLLoopOptions = Field(default_factory=RLLoopOptions)
    device: str = "cpu"

    @field_validator("env", "encoder", "method", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        return named(value)

    @field_validator("engine", mode="before")
    @classmethod
    def _reproducible_engine(cls, value: Any) -> Any:
        return {**REPRODUCIBLE_ENGINE, **value} if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _cadence(self) -> RLConfig:
        t = self.train
        for key in ("eval_every", "checkpoint_every"):
            if getattr(t, key) > t.steps:
                raise ValueError(f"train.{key} ({getattr(t, key)}) is larger than train.steps ({t.steps}); expected "
                                 f"at most the budget")
        return self

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", exclude_none=True), sort_keys=False)


def load_rl_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (),
                   raw: dict[str, Any] | None = None) -> RLConfig:
    """Read YAML (or take ``raw``), apply ``--set key=value`` overrides, validate."""
    raw = read_raw(path, overrides, raw)
    if "env" not in raw:
        raise ConfigError("invalid config:\n  env: a multi-task environment family is required, e.g. `env: pendulum` "
                          "(see polytask.rl.envs)")
    try:
        return RLConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_errors(exc, RLConfig)) from None
