"""Fully connected encoder for flat feature vectors."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError
from polytask.models.encoders.base import ENCODERS
from polytask.models.heads import layer_sizes, mlp_layers


@ENCODERS.register("mlp")
class MLP(nn.Module):
    """Multilayer perceptron: ``in_features`` → hidden[0] → … → hidden[-1], ReLU between."""

    def __init__(self, *, in_features: int, hidden: Sequence[int] = (128, 64), dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(in_features, int) or in_features < 1:
            raise InvalidParameterError(f"`in_features` of `mlp` must be a positive int; found {in_features!r}")
        hidden = layer_sizes(hidden, "hidden", "mlp", allow_empty=False)
        self.net = mlp_layers(in_features, hidden, None, dropout=dropout)
        self.in_features = in_features
        self.out_features = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1))

    def stages(self) -> list[nn.Module]:
        """One stage per hidden layer (Linear → activation → dropout), sharing this encoder's modules."""
        starts = [i for i, m in enumerate(self.net) if isinstance(m, nn.Linear)]
        bounds = [*starts[1:], len(self.net)]
        first = nn.Sequential(nn.Flatten(1), *self.net[starts[0]:bounds[0]])
        return [first] + [self.net[a:b] for a, b in zip(starts[1:], bounds[1:], strict=True)]
