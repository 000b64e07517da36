"""Temperature sampling: p ∝ n^(1/τ)."""

from __future__ import annotations

from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.data.samplers.base import SAMPLERS, Sampler


@SAMPLERS.register("temperature")
class Temperature(Sampler):
    """pᵢ ∝ nᵢ^(1/τ) (Arivazhagan et al., "Massively Multilingual NMT in the Wild", 2019).

    τ = 1 is proportional sampling, τ → ∞ uniform; τ between them up-samples small tasks.
    """

    def __init__(self, *, temperature: float = 2.0) -> None:
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise InvalidParameterError(f"`temperature` of `temperature` sampler must be > 0; found {temperature!r}")
        self.temperature = float(temperature)

    def probabilities(self, step: int, total_steps: int) -> Tensor:
        p = self._sizes() ** (1.0 / self.temperature)
        return p / p.sum()
