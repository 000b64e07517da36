"""A replay buffer keyed by task: one ring buffer per task, a minibatch per task per draw.

Every task's transitions live in its own slice ``[task, position]`` of a (T, capacity, ...)
tensor, so a task's data never displaces another's. A draw returns B
transitions of every task, shape (T, B, ...), indices drawn uniformly from each task's filled
part with the caller's ``torch.Generator``, so the draws of a run are a function of its seed.

``state_dict`` holds the filled part of every array and each task's position and size, so a
resumed run samples exactly what the uninterrupted one would.

Departures:
    mtrl's multi-task buffer interleaves all tasks in one ring and draws the minibatch of each
    task by index arithmetic; here each task has its own ring. With lockstep collection both keep
    the same transitions; per-task positions also hold for families whose tasks step at
    different rates.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError, ShapeError

FIELDS = ("obs", "action", "reward", "next_obs", "terminated")


@dataclass(frozen=True)
class Batch:
    """Transitions of every task, task axis first: obs (T, B, obs_dim), action (T, B, act_dim),
    reward (T, B), next_obs (T, B, obs_dim), terminated (T, B) as 0.0 / 1.0."""

    obs: Tensor
    action: Tensor
    reward: Tensor
    next_obs: Tensor
    terminated: Tensor

    def split(self, parts: int) -> list[Batch]:
        """The batch cut along B into ``parts`` equal parts (methods that compare part gradients)."""
        size = self.obs.shape[1] // parts
        return [Batch(*(getattr(self, f)[:, k * size:(k + 1) * size] for f in FIELDS)) for k in range(parts)]


class TaskReplayBuffer:
    """T ring buffers of ``capacity`` transitions each, filled in lockstep by :meth:`add`."""

    def __init__(self, num_tasks: int, capacity: int, obs_dim: int, act_dim: int) -> None:
        for name, value in (("num_tasks", num_tasks), ("capacity", capacity), ("obs_dim", obs_dim), ("act_dim", act_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidParameterError(f"`{name}` of the replay buffer must be an int >= 1; found {value!r}")
        self.num_tasks, self.capacity, self.obs_dim, self.act_dim = num_tasks, capacity, obs_dim, act_dim
        shapes = {"obs": (obs_dim,), "action": (act_dim,), "reward": (), "next_obs": (obs_dim,), "terminated": ()}
        self.data = {f: torch.zeros(num_tasks, capacity, *shape) for f, shape in shapes.items()}
        self.position = torch.zeros(num_tasks, dtype=torch.long)  # where each task's next transition goes
        self.size = torch.zeros(num_tasks, dtype=torch.long)  # how many transitions each task holds

    def __len__(self) -> int:
        """Transitions held by the emptiest task (what a draw can rely on)."""
        return int(self.size.min())

    def add(self, obs: np.ndarray | Tensor, action: np.ndarray | Tensor, reward: np.ndarray | Tensor,
            next_obs: np.ndarray | Tensor, terminated: np.ndarray | Tensor) -> None:
        """Store one transition of every task (arrays with the task axis first, length T)."""
        values = dict(zip(FIELDS, (obs, action, reward, next_obs, terminated), strict=True))
        rows = torch.arange(self.num_tasks)
        for name, value in values.items():
            tensor = torch.as_tensor(np.asarray(value), dtype=torch.float32)
            expected = (self.num_tasks, *self.data[name].shape[2:])
            if tuple(tensor.shape) != expected:
                raise ShapeError(f"replay buffer: `{name}` must have shape {expected} (tasks first); "
                                 f"found {tuple(tensor.shape)}")
            self.data[name][rows, self.position] = tensor
        self.position = (self.position + 1) % self.capacity
        self.size = torch.clamp(self.size + 1, max=self.capacity)

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """B transitions of every task, drawn uniformly with replacement from each task's own data."""
        if len(self) == 0:
            raise InvalidParameterError("cannot sample from an empty replay buffer; collect transitions first")
        # floor(u · size) with u ~ U[0, 1): one draw for all tasks, each within its own filled part
        u = torch.rand(self.num_tasks, batch_size, generator=generator, dtype=torch.float64)
        index = (u * self.size[:, None]).long().clamp_max(self.size[:, None] - 1)
        rows = torch.arange(self.num_tasks)[:, None]
        return Batch(*(self.data[f][rows, index] for f in FIELDS))

    def state_dict(self) -> dict[str, Any]:
        """Contents (the filled part) and each task's position and size."""
        filled = int(self.size.max())
        return {"capacity": self.capacity, "position": self.position.clone(), "size": self.size.clone(),
                **{f: self.data[f][:, :filled].clone() for f in FIELDS}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if int(state["capacity"]) != self.capacity:
            raise InvalidParameterError(f"replay buffer: the checkpoint's capacity is {int(state['capacity'])}; "
                                        f"this buffer's is {self.capacity} (resume with the run's own sac.buffer_size)")
        for f in FIELDS:
            stored = state[f]
            if stored.shape[0] != self.num_tasks or stored.shape[2:] != self.data[f].shape[2:]:
                raise ShapeError(f"replay buffer: the checkpoint's `{f}` has shape {tuple(stored.shape)}; expected "
                                 f"({self.num_tasks}, ≤{self.capacity}, ...{tuple(self.data[f].shape[2:])})")
            self.data[f].zero_()
            self.data[f][:, :stored.shape[1]] = stored
        self.position = state["position"].clone()
        self.size = state["size"].clone()
