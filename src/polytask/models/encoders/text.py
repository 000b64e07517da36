"""Encoder for token-id sequences: a token embedding read by an embedding bag, a GRU/LSTM or a
small Transformer encoder."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence

from polytask.core.errors import DataError, InvalidParameterError, ShapeError
from polytask.models.encoders.base import ENCODERS

KINDS = ("bag", "gru", "lstm", "transformer")


@ENCODERS.register("text")
class Text(nn.Module):
    """Token ids (batch, L), padded with ``padding_idx`` → (batch, out_features).

    ``kind``: ``bag`` (mean of the token embeddings, ``nn.EmbeddingBag``), ``gru`` / ``lstm``
    (last hidden state of a packed recurrent network, both directions when ``bidirectional``),
    ``transformer`` (``layers`` encoder layers with ``heads`` heads over token + learned position
    embeddings, mean over the non-padding positions). A linear layer with ReLU gives
    ``out_features``. Padding never enters the result; an all-padding row encodes as zeros
    before that layer.
    """

    def __init__(self, *, vocab_size: int, embedding_dim: int = 64, kind: str = "bag", hidden: int = 64,
                 layers: int = 1, heads: int = 4, bidirectional: bool = False, max_length: int = 512,
                 out_features: int = 64, dropout: float = 0.0, padding_idx: int = 0) -> None:
        super().__init__()
        if kind not in KINDS:
            raise InvalidParameterError(f"`kind` of `text` must be one of {', '.join(KINDS)}; found {kind!r}")
        for key, value in (("vocab_size", vocab_size), ("embedding_dim", embedding_dim), ("hidden", hidden),
                           ("layers", layers), ("heads", heads), ("max_length", max_length),
                           ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise InvalidParameterError(f"`{key}` of `text` must be a positive int; found {value!r}")
        if not 0 <= padding_idx < vocab_size:
            raise InvalidParameterError(f"`padding_idx` of `text` must be in [0, {vocab_size}); found {padding_idx!r}")
        if kind == "transformer" and embedding_dim % heads:
            raise InvalidParameterError(f"`embedding_dim` ({embedding_dim}) of `text` must be divisible by `heads` ({heads})")
        self.kind, self.padding_idx, self.max_length = kind, padding_idx, max_length
        width = embedding_dim
        if kind == "bag":
            self.embedding: nn.Module = nn.EmbeddingBag(vocab_size, embedding_dim, mode="mean", padding_idx=padding_idx)
        else:
            self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        if kind in ("gru", "lstm"):
            rnn = nn.GRU if kind == "gru" else nn.LSTM
            self.rnn = rnn(embedding_dim, hidden, num_layers=layers, batch_first=True, bidirectional=bidirectional,
                           dropout=dropout if layers > 1 else 0.0)
            width = hidden * (2 if bidirectional else 1)
        elif kind == "transformer":
            self.position = nn.Embedding(max_length, embedding_dim)
            layer = nn.TransformerEncoderLayer(embedding_dim, heads, dim_feedforward=hidden, dropout=dropout,
                                               batch_first=True)
            self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.proj = nn.Sequential(nn.Linear(width, out_features), nn.ReLU(), nn.Dropout(dropout))
        self.out_features = out_features

    def forward(self, tokens: Tensor) -> Tensor:
        if tokens.dim() != 2 or tokens.is_floating_point():
            raise ShapeError(f"`text` expects integer token ids (batch, length); found {tokens.dtype} {tuple(tokens.shape)}")
        tokens = tokens.long()
        vocab_size = self.embedding.num_embeddings
        wrong = (tokens < 0) | (tokens >= vocab_size)
        if wrong.any():  # the embedding's own IndexError names neither the row nor the range
            row, col = (int(v) for v in wrong.nonzero()[0])
            raise DataError(f"`text`: row {row}, position {col} has token id {int(tokens[row, col])}; expected ids in "
                            f"[0, {vocab_size}) (`vocab_size` {vocab_size}: the data's vocabulary must not be larger)")
        keep = tokens != self.padding_idx
        if self.kind == "bag":
            pooled = self.embedding(tokens)
        elif self.kind in ("gru", "lstm"):
            lengths = keep.sum(1).clamp(min=1).cpu()
            packed = pack_padded_sequence(self.embedding(tokens), lengths, batch_first=True, enforce_sorted=False)
            _, state = self.rnn(packed)
            h = state[0] if self.kind == "lstm" else state
            last = h[-2:] if self.rnn.bidirectional else h[-1:]
            pooled = torch.cat(list(last), dim=1) * keep.any(1, keepdim=True)
        else:
            if tokens.shape[1] > self.max_length:
                raise ShapeError(f"`text` got sequences of length {tokens.shape[1]}; `max_length` is {self.max_length}")
            positions = torch.arange(tokens.shape[1], device=tokens.device)
            h = self.embedding(tokens) + self.position(positions)[None]
            empty = ~keep.any(1)
            mask = ~keep
            mask[empty, 0] = False  # let an all-padding row attend to one slot; zeroed below
            h = self.transformer(h, src_key_padding_mask=mask)
            weights = keep.unsqueeze(-1).to(h.dtype)
            pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.proj(pooled)
