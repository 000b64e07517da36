"""A small tokenizer and vocabulary for text tasks: lower-cased word/number/punctuation tokens,
ids by frequency, padding and unknown slots, a JSON-able state."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError

TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")
PAD, UNK = "<pad>", "<unk>"


def tokenize(text: str | None) -> list[str]:
    """Lower-cased words (with an apostrophe suffix such as "n't" kept), numbers and single
    punctuation marks; None or NaN gives no tokens."""
    if not isinstance(text, str):
        return []
    return TOKEN.findall(text.lower())


class Vocabulary:
    """Token → id. Id 0 is padding, id 1 unknown, then tokens by decreasing training frequency
    (ties alphabetical), keeping those seen at least ``min_frequency`` times, at most ``max_size``
    ids in all."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if list(tokens[:2]) != [PAD, UNK]:
            raise InvalidParameterError(f"a vocabulary starts with {PAD!r} and {UNK!r}; found {list(tokens[:2])}")
        self.tokens = list(tokens)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Iterable[str | None], *, min_frequency: int = 2, max_size: int | None = 20000) -> Vocabulary:
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise InvalidParameterError(f"`min_frequency` must be an int >= 1; found {min_frequency!r}")
        if max_size is not None and (not isinstance(max_size, int) or max_size < 3):
            raise InvalidParameterError(f"`max_size` must be an int >= 3 or None; found {max_size!r}")
        counts = Counter(tok for text in texts for tok in tokenize(text))
        kept = sorted((t for t, c in counts.items() if c >= min_frequency), key=lambda t: (-counts[t], t))
        if max_size is not None:
            kept = kept[:max_size - 2]
        return cls([PAD, UNK, *kept])

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def padding_idx(self) -> int:
        return 0

    def encode(self, text: str | None) -> list[int]:
        return [self.index.get(t, 1) for t in tokenize(text)]

    def encode_batch(self, texts: Iterable[str | None], max_length: int) -> Tensor:
        """(n, max_length) int64 ids: each text truncated to its first ``max_length`` tokens, padded with 0."""
        if not isinstance(max_length, int) or max_length < 1:
            raise InvalidParameterError(f"`max_length` must be a positive int; found {max_length!r}")
        rows = [self.encode(t)[:max_length] for t in texts]
        out = torch.zeros(len(rows), max_length, dtype=torch.long)
        for i, ids in enumerate(rows):
            if ids:
                out[i, :len(ids)] = torch.tensor(ids)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"tokens": self.tokens}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> Vocabulary:
        return cls(state["tokens"])
