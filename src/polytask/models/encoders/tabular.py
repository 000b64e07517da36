"""Encoder for tables: standardised numeric columns plus a learned embedding per categorical column."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.models.encoders.base import ENCODERS
from polytask.models.heads import layer_sizes, mlp_layers


def embedding_size(cardinality: int, cap: int = 16) -> int:
    """A common rule of thumb: min(cap, ⌈1.6 · n^0.56⌉) dimensions for n categories."""
    return max(1, min(cap, round(1.6 * cardinality**0.56)))


@ENCODERS.register("tabular")
class Tabular(nn.Module):
    """Numbers and categorical codes → [numbers, embeddings] → MLP.

    Input: float (batch, n_numeric + len(cardinalities)); the first ``n_numeric`` columns are
    numbers, the rest integer codes of the categorical columns (what ``TabularPreprocessor`` with
    ``encoding="codes"`` produces; code ``cardinality − 1`` is its unseen/missing slot).
    ``embedding_dim`` fixes every embedding's width; None picks one per column from its cardinality.
    """

    def __init__(self, *, n_numeric: int, cardinalities: Sequence[int], embedding_dim: int | None = None,
                 hidden: Sequence[int] = (128, 64), dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(n_numeric, int) or n_numeric < 0:
            raise InvalidParameterError(f"`n_numeric` of `tabular` must be an int >= 0; found {n_numeric!r}")
        if any(not isinstance(c, int) or c < 1 for c in cardinalities):
            raise InvalidParameterError(f"`cardinalities` of `tabular` must be positive ints; found {list(cardinalities)}")
        if embedding_dim is not None and (not isinstance(embedding_dim, int) or embedding_dim < 1):
            raise InvalidParameterError(f"`embedding_dim` of `tabular` must be a positive int or null; found {embedding_dim!r}")
        hidden = layer_sizes(hidden, "hidden", "tabular", allow_empty=False)
        self.n_numeric = n_numeric
        self.cardinalities = [int(c) for c in cardinalities]
        self.embeddings = nn.ModuleList(nn.Embedding(c, embedding_dim or embedding_size(c)) for c in self.cardinalities)
        width = n_numeric + sum(e.embedding_dim for e in self.embeddings)
        if width == 0:
            raise InvalidParameterError("`tabular` needs at least one numeric or categorical column")
        self.net = mlp_layers(width, hidden, None, dropout=dropout)
        self.out_features = hidden[-1]

    def forward(self, x: Tensor) -> Tensor:
        expected = self.n_numeric + len(self.cardinalities)
        if x.dim() != 2 or x.shape[1] != expected:
            raise ShapeError(f"`tabular` expects (batch, {expected}) = {self.n_numeric} numbers + "
                             f"{len(self.cardinalities)} category codes; found {tuple(x.shape)}")
        codes = x[:, self.n_numeric:].long()
        parts = [x[:, :self.n_numeric].float()]
        parts += [emb(codes[:, i].clamp(0, emb.num_embeddings - 1)) for i, emb in enumerate(self.embeddings)]
        return self.net(torch.cat(parts, dim=1))
