"""Vocabularies of generation tasks: four reserved ids, texts to target rows, ids back to strings."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from polytask.core.errors import DataError, InvalidParameterError
from polytask.core.task import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from polytask.data.text import PAD, UNK, Vocabulary, tokenize

BOS, EOS = "<bos>", "<eos>"


def generation_vocabulary(texts: Iterable[str | None], *, min_frequency: int = 2, max_size: int | None = 20000) -> Vocabulary:
    """A :class:`~polytask.data.text.Vocabulary` whose ids 0–3 are padding, unknown, BOS and EOS, then
    words by decreasing frequency (ties alphabetical) seen at least ``min_frequency`` times."""
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise InvalidParameterError(f"`min_frequency` must be an int >= 1; found {min_frequency!r}")
    if max_size is not None and (not isinstance(max_size, int) or max_size < 5):
        raise InvalidParameterError(f"`max_size` of a generation vocabulary must be an int >= 5 or None; found {max_size!r}")
    counts = Counter(tok for text in texts for tok in tokenize(text))
    kept = sorted((t for t, c in counts.items() if c >= min_frequency and t not in (BOS, EOS)), key=lambda t: (-counts[t], t))
    if max_size is not None:
        kept = kept[:max_size - 4]
    vocab = Vocabulary([PAD, UNK, BOS, EOS, *kept])
    assert (vocab.index[BOS], vocab.index[EOS]) == (BOS_ID, EOS_ID)
    return vocab


def encode_targets(texts: Sequence[str | None], vocab: Vocabulary, max_length: int, *, task: str) -> Tensor:
    """(n, max_length) target ids: each text's first ``max_length − 1`` words, EOS, then padding.

    An empty text (None, NaN or no word) is an error naming the task and the row."""
    if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
        raise InvalidParameterError(f"`max_length` of generation task '{task}' must be an int >= 2 (a word and EOS); "
                                    f"found {max_length!r}")
    if vocab.tokens[:4] != [PAD, UNK, BOS, EOS]:
        raise InvalidParameterError(f"the vocabulary of generation task '{task}' must start with {[PAD, UNK, BOS, EOS]} "
                                    "(build it with polytask.text.generation_vocabulary)")
    out = torch.full((len(texts), max_length), PAD_ID, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = vocab.encode(text)[:max_length - 1]
        if not ids:
            raise DataError(f"generation task '{task}': text of row {row} is empty ({text!r}); expected at least one word")
        out[row, :len(ids) + 1] = torch.tensor([*ids, EOS_ID])
    return out


def decode_ids(ids: Tensor | Sequence[Sequence[int]], vocab: Vocabulary) -> list[str]:
    """Each row's words up to its first EOS, joined by spaces (padding and BOS skipped; unknown → <unk>)."""
    rows = ids.tolist() if isinstance(ids, Tensor) else [list(r) for r in ids]
    out = []
    for row in rows:
        words = []
        for i in row:
            if i == EOS_ID:
                break
            if i in (PAD_ID, BOS_ID):
                continue
            if not 0 <= i < len(vocab):
                raise DataError(f"token id {i} is outside the vocabulary [0, {len(vocab) - 1}]")
            words.append(vocab.tokens[i] if i != UNK_ID else UNK)
        out.append(" ".join(words))
    return out
