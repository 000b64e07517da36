"""Multi-task soft actor-critic with per-task losses balanced by a polytask method.

SAC (Haarnoja, Zhou, Abbeel & Levine, ICML 2018; Haarnoja et al., "Soft Actor-Critic
Algorithms and Applications", 2018, with the learned temperature). For every task τ with its
minibatch (s, a, r, s', d) from the task-keyed replay buffer:

* critic: y = r + γ (1 − d) (minⱼ Q'ⱼ(s', a') − α_τ log π(a'|s')), a' ~ π(·|s'), Q' the
  target networks; L^Q_τ = E[(Q₁(s, a) − y)² + (Q₂(s, a) − y)²];
* actor: L^π_τ = E[α_τ log π(ã|s) − minⱼ Qⱼ(s, ã)], ã = tanh(μ + σ ⊙ ε) reparameterised;
* temperature ("disentangled alpha", one per task, as in mtrl): L^α_τ = E[−log α_τ (log π(ã|s) + H̄)],
  target entropy H̄ = −act_dim;
* target networks: θ' ← τ θ + (1 − τ) θ' (Polyak) every ``target_update_every`` updates.

The T critic losses are combined by one :class:`polytask.Engine` over the critic's shared
parameters, the T actor losses by another over the actor's (any registered method: loss
weightings, or gradient methods such as PCGrad, Yu et al., NeurIPS 2020, whose MT10 setting
this is). The α losses are summed (each α_τ only sees its own).

The squashed Gaussian: u ~ N(μ, σ²), a = tanh(u), log π(a) = Σ [log N(u; μ, σ) − log(1 − tanh²u)],
the correction written 2 (log 2 − u − softplus(−2u)) for stability; log σ is squashed into
[log_std_min, log_std_max] by tanh as in SAC-AE / mtrl.

Why not a library: Stable-Baselines3 (2.9.2 installs against torch 2.13 without another torch)
has a single-task SAC whose ``train()`` sums one critic loss and one actor loss internally, so
per-task losses cannot reach an engine without rewriting it; torchrl (0.14.1, with tensordict)
has ``SACLoss`` modules, but they reduce over the batch without a task axis, and the replay
buffers, collectors and checkpoint formats would be a second state system next to polytask's
(exact resume from one torch.Generator would then span two libraries). What is needed — a
task-first batch, per-task losses, one generator — is ~300 lines here; gymnasium is used by the
environment families only.

Departures:
    mtrl's α loss is E[α_τ (−log π − H̄)] (gradient through α, not log α); this uses log α_τ
    as Haarnoja et al.'s softlearning and Stable-Baselines3 do (the same fixed point, a gradient
    scaled by 1/α_τ). The actor's and critic's encoders are separate networks (mtrl ties the
    actor's to the critic's and detaches it in the actor's loss).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.core.options import options
from polytask.engine import Engine
from polytask.engine.options import EngineOptions
from polytask.methods import METHODS
from polytask.rl.buffer import FIELDS, Batch
from polytask.rl.config import REPRODUCIBLE_ENGINE, SACOptions
from polytask.rl.encoders import TaskEncoder, TaskLinear, build_encoder, mlp
from polytask.train import optim_step
from polytask.train.optim_step import clear_grads


def _output(encoder: TaskEncoder, num_tasks: int, in_features: int, out_features: int) -> nn.Module:
    return TaskLinear(num_tasks, in_features, out_features) if encoder.per_task_heads else nn.Linear(in_features, out_features)


class Actor(nn.Module):
    """π(a|s, τ): encoder → trunk MLP → (μ, log σ) per action dimension, squashed by tanh."""

    def __init__(self, encoder: TaskEncoder, act_dim: int, hidden: list[int], *,
                 log_std_bounds: tuple[float, float] = (-10.0, 2.0)) -> None:
        super().__init__()
        self.encoder, self.act_dim = encoder, act_dim
        self.trunk = mlp([encoder.feature_dim, *hidden])
        self.head = _output(encoder, encoder.num_tasks, hidden[-1] if hidden else encoder.feature_dim, 2 * act_dim)
        self.log_std_min, self.log_std_max = log_std_bounds

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """μ and log σ, each (T, B, act_dim)."""
        mu, raw = self.head(self.trunk(self.encoder(obs))).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * (self.log_std_max - self.log_std_min) * (torch.tanh(raw) + 1)
        return mu, log_std

    def sample(self, obs: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A reparameterised action in (−1, 1) and its log-probability (T, B)."""
        mu, log_std = self(obs)
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        u = mu + log_std.exp() * noise
        return torch.tanh(u), squashed_log_prob(u, noise, log_std)

    def act(self, obs: Tensor) -> Tensor:
        """The deterministic action tanh(μ) (evaluation)."""
        return torch.tanh(self(obs)[0])


def squashed_log_prob(u: Tensor, noise: Tensor, log_std: Tensor) -> Tensor:
    """log π(tanh u) summed over action dimensions, with u = μ + σ ε (``noise`` = ε)."""
    gaussian = -0.5 * noise.pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    correction = 2 * (math.log(2) - u - F.softplus(-2 * u))  # log(1 − tanh²u)
    return (gaussian - correction).sum(dim=-1)


class Critic(nn.Module):
    """Twin Q(s, a, τ): one encoder of s, two trunks on [features, a]."""

    def __init__(self, encoder: TaskEncoder, act_dim: int, hidden: list[int]) -> None:
        super().__init__()
        self.encoder = encoder
        width = hidden[-1] if hidden else encoder.feature_dim + act_dim
        self.q1 = nn.Sequential(mlp([encoder.feature_dim + act_dim, *hidden]), _output(encoder, encoder.num_tasks, width, 1))
        self.q2 = nn.Sequential(mlp([encoder.feature_dim + act_dim, *hidden]), _output(encoder, encoder.num_tasks, width, 1))

    def forward(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """Q₁ and Q₂, each (T, B)."""
        x = torch.cat([self.encoder(obs), action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)


def private_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of single tasks: per-task output layers and task embeddings."""
    found: list[nn.Parameter] = []
    for sub in module.modules():
        if isinstance(sub, TaskLinear):
            found.extend(sub.parameters())
        elif isinstance(sub, TaskEncoder):
            found.extend(sub.task_parameters())
    return found


def shared_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Every trainable parameter that is not a single task's (what the engine's methods compare)."""
    private = {id(p) for p in private_parameters(module)}
    return [p for p in module.parameters() if id(p) not in private and p.requires_grad]


def critic_target(reward: Tensor, terminated: Tensor, next_q1: Tensor, next_q2: Tensor, next_log_prob: Tensor,
                  alpha: Tensor, discount: float) -> Tensor:
    """y = r + γ (1 − d) (min(Q'₁, Q'₂) − α_τ log π(a'|s')); α (T,) broadcast over the batch (T, B)."""
    soft_value = torch.minimum(next_q1, next_q2) - alpha[:, None] * next_log_prob
    return reward + discount * (1.0 - terminated) * soft_value


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, tau: float) -> None:
    """θ' ← τ θ + (1 − τ) θ' for every parameter (buffers copied)."""
    for t, s in zip(target.parameters(), source.parameters(), strict=True):
        t.lerp_(s, tau)
    for t, s in zip(target.buffers(), source.buffers(), strict=True):
        t.copy_(s)


def alpha_losses(log_alpha: Tensor, log_prob: Tensor, target_entropy: float) -> Tensor:
    """L^α_τ = E_B[−log α_τ (log π + H̄)] per task, (T,); log_prob (T, B) is detached."""
    return -(log_alpha[:, None] * (log_prob.detach() + target_entropy)).mean(dim=1)


def per_task(values: Tensor, parts: int) -> Tensor:
    """(T, B) per-sample values → the mean per task (T,), or per task and batch part (T, parts)."""
    if parts == 1:
        return values.mean(dim=1)
    t, b = values.shape
    return values[:, : b - b % parts].reshape(t, parts, -1).mean(dim=2)


def critic_losses(critic: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], batch: Batch, target_y: Tensor,
                  parts: int = 1) -> Tensor:
    """L^Q_τ for every task: (T,) or (T, parts)."""
    q1, q2 = critic(batch.obs, batch.action)
    return per_task((q1 - target_y).pow(2) + (q2 - target_y).pow(2), parts)


def actor_losses(actor: Actor, critic: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], obs: Tensor,
                 alpha: Tensor, generator: torch.Generator, parts: int = 1) -> tuple[Tensor, Tensor]:
    """L^π_τ for every task ((T,) or (T, parts)) and the sampled actions' log π (T, B)."""
    action, log_prob = actor.sample(obs, generator)
    q1, q2 = critic(obs, action)
    return per_task(alpha.detach()[:, None] * log_prob - torch.minimum(q1, q2), parts), log_prob


def named_losses(tasks: tuple[str, ...], values: Tensor) -> dict[str, Tensor]:
    return {t: values[i] for i, t in enumerate(tasks)}


def frozen(module: nn.Module) -> _Frozen:
    """A context in which ``module``'s parameters take no gradient (the critic in the actor's loss)."""
    return _Frozen(module)


class _Frozen:
    def __init__(self, module: nn.Module) -> None:
        self.params = [p for p in module.parameters() if p.requires_grad]

    def __enter__(self) -> None:
        for p in self.params:
            p.requires_grad_(False)

    def __exit__(self, *exc: Any) -> None:
        for p in self.params:
            p.requires_grad_(True)


def last_shared_layers(module: nn.Module) -> list[nn.Parameter]:
    """The last shared ``nn.Linear`` of every branch that ends the network (both Q networks, or
    the actor): the parameters of ``compare: last_shared``."""
    branches = [module.q1, module.q2] if isinstance(module, Critic) else [module.trunk, module.head]
    found: list[nn.Parameter] = []
    if isinstance(module, Actor):
        linears = [m for b in branches for m in b.modules() if isinstance(m, nn.Linear)]
        return list(linears[-1].parameters()) if linears else shared_parameters(module.encoder)
    for branch in branches:
        linears = [m for m in branch.modules() if isinstance(m, nn.Linear)]
        found.extend(linears[-1].parameters())
    return found


class MultiTaskSAC:
    """The agent: actor, twin critic and its target, one α per task, and the two engines.

    Args:
        tasks: the task names, in the order of the task axis.
        obs_dim, act_dim: of the environment family.
        encoder: an ``RL_ENCODERS`` name or ``{"name": NAME, **params}``; the actor and the critic
            each build one.
        context: (T, d) task contexts for encoders that take them (CARE); None: learned.
        sac: :class:`SACOptions` (or a mapping of its fields).
        method: a registered method name or ``{"name": NAME, **params}``; the critic's and the
            actor's engines each get their own instance.
        engine: :class:`EngineOptions` of both engines; the options whose ``auto`` chooses by
            timing default to fixed values (``REPRODUCIBLE_ENGINE``), so runs are reproducible.
        seed: initialises the networks and seeds the engines' random streams.
        device: where the networks live.
    """

    def __init__(self, tasks: Sequence[str], obs_dim: int, act_dim: int, *,
                 encoder: str | Mapping[str, Any] = "shared_mlp", context: Tensor | None = None,
                 sac: SACOptions | Mapping[str, Any] | None = None, method: str | Mapping[str, Any] = "equal",
                 engine: EngineOptions | Mapping[str, Any] | None = None, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        self.tasks = tuple(tasks)
        if len(set(self.tasks)) != len(self.tasks) or not self.tasks:
            raise InvalidParameterError(f"`tasks` must be distinct names, at least one; found {list(self.tasks)}")
        self.options = opts = options(SACOptions, sac, "sac")
        self.device = torch.device(device)
        enc_name, enc_params = _spec(encoder, "encoder")
        T = len(self.tasks)

        def make_encoder() -> TaskEncoder:
            return build_encoder(enc_name, obs_dim=obs_dim, num_tasks=T, context=context, **enc_params)

        with torch.random.fork_rng(devices=[]):  # the networks' initialisation depends on the seed alone
            torch.manual_seed(seed)
            self.actor = Actor(make_encoder(), act_dim, list(opts.hidden), log_std_bounds=opts.log_std_bounds)
            self.critic = Critic(make_encoder(), act_dim, list(opts.hidden))
        self.critic_target = copy.deepcopy(self.critic)
        self.critic_target.requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.full((T,), math.log(opts.init_alpha)))
        self.target_entropy = -float(act_dim)
        if engine is None or isinstance(engine, Mapping):  # `auto` routes are chosen by timing: not reproducible
            engine = {**REPRODUCIBLE_ENGINE, **(engine or {})}
        engine_opts = options(EngineOptions, engine, "engine").model_dump()
        with torch.random.fork_rng(devices=[]):  # a method that draws its initial state draws it from the seed
            torch.manual_seed(seed + 3)
            self.critic_engine = self._engine(method, self.critic, engine_opts, seed)
            self.actor_engine = self._engine(method, self.actor, engine_opts, seed + 1)
        for module in (self.actor, self.critic, self.critic_target):
            module.to(self.device)
        self.log_alpha.data = self.log_alpha.data.to(self.device)
        # fused Adam: one kernel over all tensors instead of ~10 ops per tensor (CARE has many small ones)
        fused = self.device.type in ("cpu", "cuda")
        self.critic_opt = torch.optim.Adam([*self.critic.parameters(), *self.critic_engine.parameters()],
                                           lr=opts.critic_lr, fused=fused)
        self.actor_opt = torch.optim.Adam([*self.actor.parameters(), *self.actor_engine.parameters()],
                                          lr=opts.actor_lr, fused=fused)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=opts.alpha_lr, fused=fused)
        self.updates = 0
        self.noise = torch.Generator(device=self.device).manual_seed(seed + 2)  # the policy's Gaussian draws

    def _engine(self, method: str | Mapping[str, Any], network: nn.Module, engine_opts: dict[str, Any],
                seed: int) -> Engine:
        name, params = _spec(method, "method")
        METHODS.check_params(name, params)
        built = METHODS.create(name, **params)
        # a task's data is its replay buffer, of the same capacity for every task (lockstep)
        built.setup(list(self.tasks), sizes={t: self.options.buffer_size for t in self.tasks})
        engine = Engine(built, shared_parameters(network), last_shared_params=last_shared_layers(network),
                        **engine_opts, seed=seed, params=network.parameters())
        if engine.compare == "features":
            whose = " (its default)" if engine_opts["compare"] == "auto" else ""
            raise InvalidParameterError(
                f"'{name}' would compare gradients on the features{whose}, but in multi-task RL each task's loss reads "
                "only its own minibatch's rows of the representation, so the task gradients there never meet (no "
                "conflict to see); use engine.compare: shared or last_shared")
        built.to(self.device)
        return engine

    @property
    def alpha(self) -> Tensor:
        """α_τ per task (T,)."""
        return self.log_alpha.detach().exp()

    @torch.no_grad()
    def act(self, obs: Tensor, *, deterministic: bool = False) -> Tensor:
        """Actions (T, act_dim) in (−1, 1) for one observation per task (T, obs_dim)."""
        x = obs.to(self.device, torch.float32)[:, None, :]
        action = self.actor.act(x) if deterministic else self.actor.sample(x, self.noise)[0]
        return action[:, 0].cpu()

    def update(self, batch: Batch) -> dict[str, Tensor]:
        """One SAC update from a task-first batch; the per-task losses, α and engine weights (T,) each."""
        batch = Batch(*(getattr(batch, f).to(self.device) for f in FIELDS))
        opts = self.options
        stats = self._update_critic(batch)
        if self.updates % opts.actor_update_every == 0:
            stats.update(self._update_actor(batch))
        if self.updates % opts.target_update_every == 0:
            soft_update(self.critic_target, self.critic, opts.tau)
        self.updates += 1
        return stats

    def _update_critic(self, batch: Batch) -> dict[str, Tensor]:
        engine, opts = self.critic_engine, self.options
        inner, outer = (batch.split(2) if engine.lookahead else (batch, None))
        with torch.no_grad():
            next_action, next_log_prob = self.actor.sample(inner.next_obs, self.noise)
            tq1, tq2 = self.critic_target(inner.next_obs, next_action)
            y = critic_target(inner.reward, inner.terminated, tq1, tq2, next_log_prob, self.alpha, opts.discount)
            outer_y = None
            if outer is not None:
                a, lp = self.actor.sample(outer.next_obs, self.noise)
                oq1, oq2 = self.critic_target(outer.next_obs, a)
                outer_y = critic_target(outer.reward, outer.terminated, oq1, oq2, lp, self.alpha, opts.discount)
        losses = critic_losses(self.critic, inner, y, engine.batch_parts)
        lookahead = None
        if outer is not None:
            lookahead = self._closure(self.critic, lambda call: critic_losses(call, outer, outer_y))
        clear_grads(self.critic_opt)
        report = engine.backward(named_losses(self.tasks, losses), lookahead=lookahead)
        self._step(self.critic_opt, self.critic)
        return {"critic_loss": per_task_values(losses),
                "critic_weight": torch.tensor([report.weights[t] for t in self.tasks])}

    def _update_actor(self, batch: Batch) -> dict[str, Tensor]:
        engine, alpha = self.actor_engine, self.alpha
        inner, outer = (batch.split(2) if engine.lookahead else (batch, None))
        with frozen(self.critic):
            losses, log_prob = actor_losses(self.actor, self.critic, inner.obs, alpha, self.noise, engine.batch_parts)
            lookahead = None
            if outer is not None:
                def outer_losses(call: Callable[..., Any]) -> Tensor:
                    mu, log_std = call(outer.obs)
                    noise = torch.randn(mu.shape, generator=self.noise, dtype=mu.dtype, device=mu.device)
                    u = mu + log_std.exp() * noise
                    q1, q2 = self.critic(outer.obs, torch.tanh(u))
                    return per_task(alpha[:, None] * squashed_log_prob(u, noise, log_std) - torch.minimum(q1, q2), 1)
                lookahead = self._closure(self.actor, outer_losses)
            clear_grads(self.actor_opt)
            report = engine.backward(named_losses(self.tasks, losses), lookahead=lookahead)
            self._step(self.actor_opt, self.actor)
        clear_grads(self.alpha_opt)
        alpha_losses(self.log_alpha, log_prob, self.target_entropy).sum().backward()
        optim_step.step(self.alpha_opt)
        weights = torch.tensor([report.weights[t] for t in self.tasks])
        return {"actor_loss": per_task_values(losses), "alpha": self.alpha.cpu(), "actor_weight": weights}

    def _closure(self, module: nn.Module, losses: Callable[[Callable[..., Any]], Tensor]):
        """The outer-batch losses at displaced parameters, for bilevel methods (``Step.lookahead``)."""
        names = {id(p): n for n, p in module.named_parameters()}

        def evaluate(replace: Mapping[int, Tensor]) -> dict[str, Tensor]:
            params = {names[i]: value for i, value in replace.items()}
            values = losses(lambda *args: torch.func.functional_call(module, params, args))
            return named_losses(self.tasks, values)
        return evaluate

    def _step(self, optimizer: torch.optim.Optimizer, network: nn.Module) -> None:
        if self.options.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.options.grad_clip)
        optim_step.step(optimizer)  # without torch's per-step Python where that is exact

    def on_epoch_end(self, epoch: int, critic_losses: Mapping[str, float], actor_losses: Mapping[str, float]) -> None:
        """For methods that adapt once per epoch (DWA): an epoch is an evaluation period."""
        self.critic_engine.method.on_epoch_end(epoch, critic_losses)
        self.actor_engine.method.on_epoch_end(epoch, actor_losses)

    # ------------------------------------------------------------------------------ state
    def networks(self) -> dict[str, nn.Module]:
        return {"actor": self.actor, "critic": self.critic, "critic_target": self.critic_target}

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": {**{k: m.state_dict() for k, m in self.networks().items()}, "log_alpha": self.log_alpha.detach().clone()},
            "optimizers": {"actor": self.actor_opt.state_dict(), "critic": self.critic_opt.state_dict(),
                           "alpha": self.alpha_opt.state_dict()},
            "engines": {"actor": self.actor_engine.state_dict(), "critic": self.critic_engine.state_dict()},
            "updates": self.updates, "noise": self.noise.get_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        model = state["model"]
        for name, module in self.networks().items():
            module.load_state_dict(model[name])
        self.log_alpha.data.copy_(model["log_alpha"])
        self.actor_opt.load_state_dict(state["optimizers"]["actor"])
        self.critic_opt.load_state_dict(state["optimizers"]["critic"])
        self.alpha_opt.load_state_dict(state["optimizers"]["alpha"])
        self.actor_engine.load_state_dict(state["engines"]["actor"])
        self.critic_engine.load_state_dict(state["engines"]["critic"])
        self.updates = int(state["updates"])
        self.noise.set_state(state["noise"])


def per_task_values(losses: Tensor) -> Tensor:
    """Detached loss per task (T,), the mean over batch parts."""
    detached = losses.detach()
    return (detached if detached.dim() == 1 else detached.mean(dim=1)).cpu()


def _spec(value: str | Mapping[str, Any], what: str) -> tuple[str, dict[str, Any]]:
    if isinstance(value, str):
        return value, {}
    if isinstance(value, Mapping) and isinstance(value.get("name"), str):
        return value["name"], {k: v for k, v in value.items() if k != "name"}
    raise InvalidParameterError(f"`{what}` must be a registry name or {{'name': NAME, **params}}; found {value!r}")
