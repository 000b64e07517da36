"""Learning-progress bandit: EXP3 over tasks, rewarded by each task's relative loss decrease."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from polytask.core.errors import InvalidParameterError
from polytask.scheduling.base import TASK_SCHEDULERS, TaskScheduler, check_param, draw, is_count, is_number


@TASK_SCHEDULERS.register("bandit")
class Bandit(TaskScheduler):
    """EXP3 bandit over tasks rewarded by learning progress: tasks whose loss still falls train more often.

    EXP3 is from Auer, Cesa-Bianchi, Freund & Schapire, "The Nonstochastic Multiarmed Bandit
    Problem", SIAM J. Comput. 2002; the learning-progress reward and its percentile rescaling from
    Graves et al., "Automated Curriculum Learning for Neural Networks", ICML 2017.

    Arms are tasks. With log-weights sᵢ and K available tasks,

        pᵢ = (1 − γ)·exp(sᵢ) / Σⱼ exp(sⱼ) + γ/K,

    and k tasks are drawn from p without replacement. After the step, a trained task i with loss
    history ℓ (its last ``window`` losses) gets the raw progress  ν = (old − new)/old, old / new
    the means of the older / newer half of the window (the relative loss decrease). With
    ``rescale`` the raw progress is mapped through the 20th/80th percentiles of recent raw rewards
    (as Graves et al. do) so the reward is scale-free; it is then clipped to r ∈ [0, 1]. EXP3's
    importance-weighted update  sᵢ ← sᵢ + η·r/πᵢ  (πᵢ = min(1, k·pᵢ), the inclusion probability for
    k = 1 exactly, approximately for k > 1) follows; every step all sᵢ are first multiplied by
    ``decay`` (1: plain EXP3; < 1 forgets old rewards, as a task's progress is not stationary).
    η defaults to γ/K, Auer et al.'s choice.

    The loss of a step is computed before that step's update, on a batch the model has not yet
    been updated on this epoch, so it stands in for a held-out measurement at no extra cost.
    With ``reward: validation`` the rewards come from held-out data instead: at every epoch end
    each task's raw progress is the relative decrease of its validation loss since the previous
    epoch end, and the importance weight is the task's mean inclusion probability over the
    epoch's steps (``observe_validation``, called by the ``diagnostics`` callback, which this
    option needs, with validation data). Training losses then give no reward. An epoch gives one
    reward per task, far fewer than steps do: a larger ``lr`` (e.g. 1) lets them count.
    All state (log-weights, loss windows, raw-reward history) is in ``state_dict`` as floats.
    """

    def __init__(self, *, k: int = 1, gamma: float = 0.1, lr: float | None = None, window: int = 10,
                 decay: float = 0.99, rescale: bool = True, history: int = 500, reward: str = "train") -> None:
        check_param(is_count(k), "k", "bandit", "an int >= 1", k)
        check_param(is_number(gamma) and 0 < gamma <= 1, "gamma", "bandit", "in (0, 1]", gamma)
        check_param(lr is None or (is_number(lr) and lr > 0), "lr", "bandit", "> 0 or None", lr)
        check_param(is_count(window) and window >= 2, "window", "bandit", "an int >= 2", window)
        check_param(is_number(decay) and 0 < decay <= 1, "decay", "bandit", "in (0, 1]", decay)
        check_param(isinstance(rescale, bool), "rescale", "bandit", "true or false", rescale)
        check_param(is_count(history), "history", "bandit", "an int >= 1", history)
        check_param(reward in ("train", "validation"), "reward", "bandit", "'train' or 'validation'", reward)
        self.reward_source = reward
        self.fed_by_diagnostics = False  # set by the diagnostics callback, which passes validation losses
        self.k, self.gamma, self.lr, self.window = k, float(gamma), lr, window
        self.decay, self.rescale, self.history = float(decay), rescale, history

    def setup(self, tasks: Sequence[str]) -> None:
        super().setup(tasks)
        self.log_weights = {t: 0.0 for t in self.tasks}
        self.losses: dict[str, list[float]] = {t: [] for t in self.tasks}
        self.raw_rewards: list[float] = []
        self.inclusion: dict[str, float] = {}
        self.val_losses: dict[str, float] = {}
        self.epoch_inclusion: dict[str, float] = {}
        self.epoch_steps = 0

    def probabilities(self, available: Sequence[str]) -> torch.Tensor:
        """The EXP3 distribution over ``available`` tasks."""
        s = torch.tensor([self.log_weights[t] for t in available], dtype=torch.float64)
        return (1 - self.gamma) * torch.softmax(s, 0) + self.gamma / len(available)

    def select(self, step: int, available: Sequence[str], generator: torch.Generator) -> list[str]:
        if not available:
            return []
        if self.reward_source == "validation" and not self.fed_by_diagnostics:
            raise InvalidParameterError("the bandit's `reward: validation` needs the diagnostics callback to pass it the "
                                        "validation losses: add callbacks: [{name: diagnostics, affinity_every: 0}] "
                                        "(and validation data)")
        p = self.probabilities(available)
        self.inclusion = {t: min(1.0, min(self.k, len(available)) * float(p[i])) for i, t in enumerate(available)}
        self.epoch_steps += 1
        for task, value in self.inclusion.items():
            self.epoch_inclusion[task] = self.epoch_inclusion.get(task, 0.0) + value
        return [available[i] for i in draw(p, self.k, generator)]

    def observe(self, step: int, losses: Mapping[str, float]) -> None:
        if self.reward_source == "validation":
            return
        lr = self.lr if self.lr is not None else self.gamma / len(self.tasks)
        rewards = {}
        for task, loss in losses.items():
            if task not in self.losses or not math.isfinite(loss):
                continue
            window = self.losses[task]
            window.append(float(loss))
            del window[:-self.window]
            if len(window) == self.window:
                rewards[task] = self.reward(self.progress(window))
        self._update(rewards, {t: self.inclusion.get(t, 1.0 / len(self.tasks)) for t in rewards}, lr)

    def _update(self, rewards: Mapping[str, float], inclusion: Mapping[str, float], lr: float) -> None:
        for task in self.log_weights:
            self.log_weights[task] *= self.decay
        for task, reward in rewards.items():
            self.log_weights[task] += lr * reward / max(inclusion[task], 1e-12)
        shift = max(self.log_weights.values())  # softmax is shift-invariant; keeps exp() in range
        self.log_weights = {t: s - shift for t, s in self.log_weights.items()}

    def observe_validation(self, epoch: int, losses: Mapping[str, float]) -> None:
        """Held-out feedback at an epoch end: each task's validation loss (``reward: validation`` only)."""
        if self.reward_source != "validation":
            return
        lr = self.lr if self.lr is not None else self.gamma / len(self.tasks)
        rewards, inclusion = {}, {}
        for task, loss in losses.items():
            if task not in self.log_weights or not math.isfinite(loss):
                continue
            previous = self.val_losses.get(task)
            self.val_losses[task] = float(loss)
            if previous is not None and self.epoch_steps:
                rewards[task] = self.reward(self.progress([previous, float(loss)]))
                inclusion[task] = self.epoch_inclusion.get(task, 0.0) / self.epoch_steps
        self._update(rewards, inclusion, lr)
        self.epoch_inclusion, self.epoch_steps = {}, 0

    def progress(self, window: Sequence[float]) -> float:
        """(old − new)/old over the two halves of a task's loss window: the raw learning progress."""
        half = len(window) // 2
        old, new = sum(window[:half]) / half, sum(window[-half:]) / half
        return (old - new) / abs(old) if old != 0 else 0.0

    def reward(self, raw: float) -> float:
        """Raw progress → reward in [0, 1] (percentile rescaling when ``rescale``)."""
        if not self.rescale:
            return min(max(raw, 0.0), 1.0)
        self.raw_rewards.append(raw)
        del self.raw_rewards[:-self.history]
        ranked = sorted(self.raw_rewards)
        low, high = ranked[int(0.2 * (len(ranked) - 1))], ranked[int(0.8 * (len(ranked) - 1))]
        if high - low <= 1e-12:
            return 1.0 if raw > high else 0.0 if raw < low else 0.5
        return min(max((raw - low) / (high - low), 0.0), 1.0)

    def state_dict(self) -> dict:
        return {"log_weights": dict(self.log_weights), "losses": {t: list(v) for t, v in self.losses.items()},
                "raw_rewards": list(self.raw_rewards), "inclusion": dict(self.inclusion),
                "val_losses": dict(self.val_losses), "epoch_inclusion": dict(self.epoch_inclusion),
                "epoch_steps": self.epoch_steps}

    def load_state_dict(self, state: Mapping) -> None:
        self.log_weights = {t: float(state["log_weights"].get(t, 0.0)) for t in self.tasks}
        self.losses = {t: [float(v) for v in state["losses"].get(t, [])] for t in self.tasks}
        self.raw_rewards = [float(v) for v in state["raw_rewards"]]
        self.inclusion = {t: float(v) for t, v in state.get("inclusion", {}).items()}
        self.val_losses = {t: float(v) for t, v in state.get("val_losses", {}).items()}
        self.epoch_inclusion = {t: float(v) for t, v in state.get("epoch_inclusion", {}).items()}
        self.epoch_steps = int(state.get("epoch_steps", 0))

    def __repr__(self) -> str:
        return (f"Bandit(k={self.k}, gamma={self.gamma}, lr={self.lr}, window={self.window}, decay={self.decay}, "
                f"rescale={self.rescale}, history={self.history}, reward={self.reward_source!r})")
