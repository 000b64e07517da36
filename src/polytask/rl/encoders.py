"""Observation encoders for multi-task RL, registered by name in ``RL_ENCODERS``.

An encoder maps observations laid out task-first, (T, B, obs_dim) — row t holds task t's
observations — to features (T, B, feature_dim), so the task of every row is its index and no
task id travels with the data. The actor and the critic each own one (see ``polytask.rl.sac``).

* ``shared_mlp``: one MLP for every task; it cannot tell the tasks apart (the MT-SAC baseline
  when every task has the same observation space).
* ``onehot_mlp``: the MLP reads the observation concatenated with the task's one-hot vector, or
  with a learned embedding of the task (``embedding_dim``) — mtrl's "multi-task SAC with task
  encoding".
* ``per_task_heads``: the shared MLP, and the actor's and critic's output layers are one per task
  (``per_task_heads = True``: the networks build :class:`TaskLinear` outputs).
* ``care``: CARE (Sodhani, Zhang & Pineau, "Multi-Task Reinforcement Learning with
  Context-based Representations", ICML 2021). k MLP encoders give k representations
  e₁(s) … e_k(s); the task's context c_τ (a fixed vector per task, e.g. a sentence embedding of
  its description, or a learned one) is projected to z_τ = g(c_τ); attention weights
  α_τ = softmax(h(z_τ) / temperature) ∈ Δᵏ mix them into m = Σⱼ α_τⱼ eⱼ(s), and the feature is
  [m, z_τ] (the mixture concatenated with the projected context, Section 4 of the paper).

Departures:
    CARE's attention network reads the projected context detached (mtrl's
    ``should_detach_task_encoding``), so the context encoder learns through the concatenated
    z_τ only; ``detach_attention_context: false`` lets both paths train it. mtrl ties the
    actor's encoder to the critic's; here each network owns its encoder (no tying).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.core.registry import Registry

RL_ENCODERS: Registry[TaskEncoder] = Registry("rl encoder")


def mlp(widths: Sequence[int], *, last_activation: bool = True) -> nn.Sequential:
    """Linear layers between consecutive ``widths`` with ReLU between them (and after the last
    one when ``last_activation``)."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if last_activation or k < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def _widths(owner: str, name: str, value: Sequence[int]) -> list[int]:
    widths = list(value)
    if any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise InvalidParameterError(f"`{name}` of rl encoder '{owner}' must be a list of ints >= 1; found {value!r}")
    return widths


def _positive_int(owner: str, name: str, value: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidParameterError(f"`{name}` of rl encoder '{owner}' must be an int >= 1; found {value!r}")
    return value


class TaskLinear(nn.Module):
    """One linear layer per task on task-first inputs: y[t] = x[t] W_t + b_t, x (T, B, in)."""

    def __init__(self, num_tasks: int, in_features: int, out_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)  # nn.Linear's default initialisation, per task
        self.weight = nn.Parameter(torch.empty(num_tasks, in_features, out_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks, 1, out_features).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return torch.baddbmm(self.bias, x, self.weight)


class TaskEncoder(nn.Module):
    """(T, B, obs_dim) observations → (T, B, feature_dim) features.

    Class attributes: ``per_task_heads`` asks the networks for one output layer per task;
    ``uses_context`` says the encoder takes task contexts (``context=``).
    """

    per_task_heads: ClassVar[bool] = False
    uses_context: ClassVar[bool] = False
    feature_dim: int

    def __init__(self, obs_dim: int, num_tasks: int) -> None:
        super().__init__()
        self.obs_dim, self.num_tasks = obs_dim, num_tasks

    def check(self, obs: Tensor) -> None:
        if obs.dim() != 3 or obs.shape[0] != self.num_tasks or obs.shape[2] != self.obs_dim:
            raise ShapeError(f"rl encoder '{self.registry_name}' takes observations of shape (T={self.num_tasks}, B, "
                             f"obs_dim={self.obs_dim}), tasks first; found {tuple(obs.shape)}")

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters that belong to single tasks (a task embedding table): not shared."""
        return []

    @property
    def registry_name(self) -> str:
        return getattr(type(self), "registry_name", type(self).__name__)


@RL_ENCODERS.register("shared_mlp")
class SharedMLP(TaskEncoder):
    """One MLP for every task (it does not see which task a row is)."""

    def __init__(self, obs_dim: int, num_tasks: int, *, hidden: Sequence[int] = (50,), feature_dim: int = 50) -> None:
        super().__init__(obs_dim, num_tasks)
        self.hidden = _widths(self.registry_name, "hidden", hidden)
        self.feature_dim = _positive_int(self.registry_name, "feature_dim", feature_dim)
        self.net = mlp([obs_dim, *self.hidden, self.feature_dim])

    def forward(self, obs: Tensor) -> Tensor:
        self.check(obs)
        return self.net(obs)


@RL_ENCODERS.register("per_task_heads")
class PerTaskHeads(SharedMLP):
    """The shared MLP, with one output layer per task in the actor and the critic."""

    per_task_heads = True


@RL_ENCODERS.register("onehot_mlp")
class OneHotMLP(TaskEncoder):
    """An MLP on [observation, task code]: the task's one-hot vector, or a learned embedding
    of width ``embedding_dim``."""

    def __init__(self, obs_dim: int, num_tasks: int, *, hidden: Sequence[int] = (50,), feature_dim: int = 50,
                 embedding_dim: int | None = None) -> None:
        super().__init__(obs_dim, num_tasks)
        self.hidden = _widths(self.registry_name, "hidden", hidden)
        self.feature_dim = _positive_int(self.registry_name, "feature_dim", feature_dim)
        if embedding_dim is None:
            self.register_buffer("codes", torch.eye(num_tasks))
            self.embedding = None
            width = num_tasks
        else:
            width = _positive_int(self.registry_name, "embedding_dim", embedding_dim)
            self.embedding = nn.Parameter(torch.randn(num_tasks, width) / math.sqrt(width))
        self.net = mlp([obs_dim + width, *self.hidden, self.feature_dim])

    def task_parameters(self) -> list[nn.Parameter]:
        return [] if self.embedding is None else [self.embedding]

    def forward(self, obs: Tensor) -> Tensor:
        self.check(obs)
        codes = self.codes if self.embedding is None else self.embedding
        return self.net(torch.cat([obs, codes[:, None, :].expand(-1, obs.shape[1], -1)], dim=-1))


class ParallelMLP(nn.Module):
    """k MLPs of the same widths evaluated together: (N, in) → (k, N, out), one batched matmul
    per layer instead of k small ones."""

    def __init__(self, copies: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            bound = 1.0 / math.sqrt(a)
            self.weights.append(nn.Parameter(torch.empty(copies, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(copies, 1, b).uniform_(-bound, bound)))

    def forward(self, x: Tensor) -> Tensor:
        # every copy reads the same input: a stride-0 expand, no copy; the layout stays (k, N, ·)
        h = x.unsqueeze(0).expand(len(self.weights[0]), -1, -1)
        for k, (w, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = torch.baddbmm(bias, torch.relu(h) if k else h, w)
        return torch.relu(h)


@RL_ENCODERS.register("care")
class CARE(TaskEncoder):
    """CARE: k MLP encoders mixed by an attention computed from each task's context.

    Args:
        experts: k, the number of encoders.
        hidden, feature_dim: the widths of every encoder (obs → hidden → feature_dim).
        context: a (T, d) tensor of task contexts (a sentence embedding of each task's
            description); None learns a context vector per task of width ``context_width``.
        context_width: d, the width the contexts must have (checked against ``context``);
            default: the given context's width, or 50 for learned contexts.
        context_hidden, context_dim: the context encoder d → context_hidden → context_dim.
        attention_hidden: the attention network context_dim → attention_hidden → k.
        temperature: of the attention softmax.
        detach_attention_context: the attention reads the projected context detached (mtrl).
    """

    uses_context = True

    def __init__(self, obs_dim: int, num_tasks: int, *, experts: int = 4, hidden: Sequence[int] = (50,),
                 feature_dim: int = 50, context: Tensor | None = None, context_width: int | None = None,
                 context_hidden: Sequence[int] = (50,), context_dim: int = 50, attention_hidden: Sequence[int] = (50,),
                 temperature: float = 1.0, detach_attention_context: bool = True) -> None:
        super().__init__(obs_dim, num_tasks)
        name = self.registry_name
        self.experts = _positive_int(name, "experts", experts)
        self.hidden = _widths(name, "hidden", hidden)
        self.encoder_dim = _positive_int(name, "feature_dim", feature_dim)
        self.context_dim = _positive_int(name, "context_dim", context_dim)
        if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
            raise InvalidParameterError(f"`temperature` of rl encoder '{name}' must be > 0; found {temperature!r}")
        self.temperature, self.detach_attention_context = float(temperature), bool(detach_attention_context)
        if context is None:
            width = 50 if context_width is None else _positive_int(name, "context_width", context_width)
            self.learned_context = nn.Parameter(torch.randn(num_tasks, width) / math.sqrt(width))
        else:
            context = torch.as_tensor(context, dtype=torch.float32)
            self._check_context(context, context_width)
            width = context.shape[1]
            self.register_buffer("fixed_context", context.clone())
            self.learned_context = None
        self.context_width = width
        self.feature_dim = self.encoder_dim + self.context_dim
        self.encoders = ParallelMLP(self.experts, [obs_dim, *self.hidden, self.encoder_dim])
        self.context_encoder = mlp([width, *_widths(name, "context_hidden", context_hidden), self.context_dim])
        self.attention = mlp([self.context_dim, *_widths(name, "attention_hidden", attention_hidden), self.experts],
                             last_activation=False)

    def _check_context(self, context: Tensor, width: int | None) -> None:
        name = self.registry_name
        if context.dim() != 2 or context.shape[0] != self.num_tasks:
            raise ShapeError(f"rl encoder '{name}': the task contexts must be a (T, d) array with one row per task, "
                             f"T={self.num_tasks}; found shape {tuple(context.shape)}")
        if width is not None and context.shape[1] != width:
            raise ShapeError(f"rl encoder '{name}': the task contexts must have width context_width={width}; found "
                             f"width {context.shape[1]} (shape {tuple(context.shape)}): embed the descriptions with "
                             "the model that gives that width, or change context_width")
        if not bool(torch.isfinite(context).all()):
            row = int((~torch.isfinite(context)).any(dim=1).nonzero()[0])
            raise ShapeError(f"rl encoder '{name}': the context of task row {row} has a non-finite value; expected "
                             "finite numbers")

    @property
    def context(self) -> Tensor:
        """The (T, d) task contexts (fixed or learned)."""
        return self.fixed_context if self.learned_context is None else self.learned_context

    def task_parameters(self) -> list[nn.Parameter]:
        return [] if self.learned_context is None else [self.learned_context]

    def _projected(self) -> Tensor:
        return self.context_encoder(self.context)  # (T, context_dim)

    def _weights(self, projected: Tensor) -> Tensor:
        source = projected.detach() if self.detach_attention_context else projected
        logits = self.attention(source)
        return torch.softmax(logits if self.temperature == 1.0 else logits / self.temperature, dim=-1)  # (T, k)

    def attention_weights(self, task_ids: Tensor | Sequence[int] | None = None) -> Tensor:
        """The mixture weights α_τ over the k encoders, (len(task_ids), k); every task by default."""
        weights = self._weights(self._projected())
        return weights if task_ids is None else weights[torch.as_tensor(task_ids, dtype=torch.long)]

    def forward(self, obs: Tensor) -> Tensor:
        self.check(obs)
        t, b, _ = obs.shape
        projected = self._projected()
        weights = self._weights(projected)  # (T, k)
        reps = self.encoders(obs.reshape(t * b, -1)).reshape(self.experts, t, b, self.encoder_dim)
        # Σⱼ α_τⱼ eⱼ(s) as a broadcast product summed over j: no permuted copies of the k representations
        mixture = (reps * weights.t()[:, :, None, None]).sum(dim=0)
        return torch.cat([mixture, projected[:, None, :].expand(-1, b, -1)], dim=-1)


def build_encoder(name: str, *, obs_dim: int, num_tasks: int, context: Tensor | None = None,
                  **params: object) -> TaskEncoder:
    """An encoder by registry name; ``context`` is handed to encoders that take one (CARE)."""
    cls = RL_ENCODERS.get(name)
    RL_ENCODERS.check_params(name, params, reserved=("obs_dim", "num_tasks", "context"))
    if context is not None and getattr(cls, "uses_context", False):
        params = {**params, "context": context}
    return RL_ENCODERS.create(name, obs_dim=obs_dim, num_tasks=num_tasks, **params)
