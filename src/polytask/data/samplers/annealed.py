"""Annealed sampling: temperature sampling whose exponent moves from proportional towards uniform."""

from __future__ import annotations

from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.data.samplers.base import SAMPLERS, Sampler


@SAMPLERS.register("annealed")
class Annealed(Sampler):
    """pᵢ(t) ∝ nᵢ^α(t), α(t) = α₀ + (α₁ − α₀)·t/(T−1), αⱼ = 1/τⱼ (Stickland & Murray, "BERT and PALs", ICML 2019).

    Stickland & Murray anneal α = 1 − 0.8·(e−1)/(E−1) over the epochs e = 1..E: proportional
    sampling at first (α = 1, τ = 1), close to uniform at the end (α = 0.2, τ = 5), so large
    tasks lead early and small tasks are not drowned out late. Here α moves linearly with the
    training step t of T total steps (the defaults reproduce that schedule); the probabilities are
    a function of (t, T) alone, so nothing needs to be checkpointed.
    """

    def __init__(self, *, start_temperature: float = 1.0, end_temperature: float = 5.0) -> None:
        for key, value in (("start_temperature", start_temperature), ("end_temperature", end_temperature)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise InvalidParameterError(f"`{key}` of `annealed` sampler must be > 0; found {value!r}")
        self.start_temperature = float(start_temperature)
        self.end_temperature = float(end_temperature)

    def exponent(self, step: int, total_steps: int) -> float:
        """α(t) = 1/τ(t), linear in t from 1/start_temperature to 1/end_temperature."""
        progress = min(max(step / (total_steps - 1), 0.0), 1.0) if total_steps > 1 else 1.0
        start, end = 1.0 / self.start_temperature, 1.0 / self.end_temperature
        return start + (end - start) * progress

    def probabilities(self, step: int, total_steps: int) -> Tensor:
        p = self._sizes() ** self.exponent(step, total_steps)
        return p / p.sum()

    def __repr__(self) -> str:
        return f"Annealed(start_temperature={self.start_temperature}, end_temperature={self.end_temperature})"
