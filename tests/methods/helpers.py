"""What the method and engine tests share: random Jacobians, method construction, steps, small models.

Every call of a method in this package goes through ``method(step)`` (the one contract: a Step in,
one Update out); :func:`direction` reads the update on θ back from an Update.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

import polytask as pt
from polytask.methods import METHODS, Method, Step
from polytask.methods.base import Update

NAMES: list[str] = METHODS.names()
#: registry entries that compare task gradients (the engine hands them a Gramian, maybe J)
GRADIENT: list[str] = [n for n in NAMES if METHODS.get(n).needs != "losses"]
#: registry entries that weight the losses only
LOSS: list[str] = [n for n in NAMES if METHODS.get(n).needs == "losses"]


def jac(seed: int, t: int = 4, p: int = 12, dtype: torch.dtype = torch.float64) -> Tensor:
    """A random task Jacobian J (t×p)."""
    return torch.randn(t, p, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def names(t: int) -> tuple[str, ...]:
    return tuple(f"t{i}" for i in range(t))


def build(name: str, tasks: Sequence[str] | None = None, *, sizes: Mapping[str, int] | None = None,
          **params) -> Method:
    """The registry entry ``name`` with ``params`` (its ``example_params`` when none are given), set
    up for ``tasks`` (with data sizes 100, 200, … unless ``sizes``); not set up when ``tasks`` is None."""
    method = METHODS.create(name, **(params or dict(METHODS.get(name).example_params)))
    if tasks is not None:
        tasks = tuple(tasks)
        method.setup(tasks, sizes=dict(sizes) if sizes is not None else {t: 100 * (i + 1) for i, t in enumerate(tasks)})
    return method


def make_step(method: Method | str, j: Tensor, losses: Tensor | Sequence[float] | None = None, *,
              tasks: Sequence[str] | None = None, index: int = 0, seed: int = 0, epoch: int = 0,
              generator: torch.Generator | None = None) -> Step:
    """The step an engine would build from J: G = J Jᵀ (for gradient methods) and J itself (for
    ``needs == "jacobian"``); losses 0.5…1.5 unless given; tasks t0, t1, … unless given."""
    needs = (METHODS.get(method) if isinstance(method, str) else method).needs
    tasks = names(len(j)) if tasks is None else tuple(tasks)
    losses = (torch.linspace(0.5, 1.5, len(j), dtype=j.dtype) if losses is None
              else torch.as_tensor(losses, dtype=j.dtype))
    return Step(tasks=tasks, losses=losses, index=index, seed=seed, epoch=epoch, generator=generator,
                gramian=None if needs == "losses" else j @ j.T, jacobian=j if needs == "jacobian" else None)


def direction(update: Update, j: Tensor) -> Tensor:
    """The update on θ: the method's direction, or Σ wᵢ gᵢ."""
    return update.direction if update.direction is not None else update.weights.detach().to(j.dtype) @ j


def weights_of(name: str, j: Tensor, *, seed: int = 0, index: int = 0, method: Method | None = None,
               generator: torch.Generator | None = None, **params) -> Tensor:
    """One step's weights of a fresh ``name`` (or of ``method``) at J."""
    if method is None:
        method = build(name, names(len(j)), **params)
    return method(make_step(method, j, index=index, seed=seed, generator=generator)).weights


# --- small models ---------------------------------------------------------------------------------


class Tiny(nn.Module):
    """A two-layer tanh encoder and one linear head per task, with fixed data per seed."""

    def __init__(self, tasks: Sequence[str] = ("t0", "t1", "t2"), seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.tasks = tuple(tasks)
        self.encoder = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(4, 1) for t in self.tasks})

    def shared(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def last_shared(self) -> list[nn.Parameter]:
        return list(self.encoder[2].parameters())

    def losses(self, seed: int = 1) -> tuple[Tensor, dict[str, Tensor]]:
        """The shared representation z and one squared-error loss per task (targets scaled apart)."""
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(16, 5, generator=gen), torch.randn(len(self.tasks), 16, generator=gen)
        z = self.encoder(x)
        return z, {t: ((self.heads[t](z).squeeze(-1) - (i + 1) * y[i]) ** 2).mean() for i, t in enumerate(self.tasks)}


def hard_sharing(n_tasks: int = 3, seed: int = 0) -> tuple[pt.models.HardSharing, list[pt.Task]]:
    """A HardSharing model (MLP encoder 4 → 6 → 5) with ``n_tasks`` regression tasks."""
    torch.manual_seed(seed)
    tasks = [pt.Task(f"t{i}", kind="regression") for i in range(n_tasks)]
    return pt.models.HardSharing(encoder=pt.encoders.MLP(in_features=4, hidden=[6, 5]), tasks=tasks), tasks


def model_losses(model, tasks, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    z = model.encode(x)
    out = model.decode(z)
    return z, {t.name: t.loss(out[t.name], y[:, i]) for i, t in enumerate(tasks)}


def grads(params: Iterable[Tensor]) -> list[Tensor]:
    """A copy of each parameter's gradient (zeros where there is none)."""
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def flat_grad(params: Iterable[Tensor]) -> Tensor:
    return torch.cat([g.reshape(-1) for g in grads(params)])


def flat(tensors: Iterable[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])
