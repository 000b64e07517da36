"""Greedy and beam-search decoding of a step function.

A step function maps the previous tokens (N,) and a decoder state (N, ...) to the next token's
log-probabilities (N, V) and the new state; decoding starts from BOS and ends a sequence at EOS.
A sequence's score is its summed log-probability divided by its length (tokens generated, EOS
included) to the power ``length_penalty`` (Wu et al., "Google's Neural Machine Translation
System", 2016, use ((5 + |Y|)/6)^α; plain |Y|^α is the form of fairseq's and Hugging Face's
``length_penalty``): 0 scores the raw sum, which favours short sequences; 1 the mean per token.

Decoded ids come back as (B, max_length) int64: the tokens, then EOS when one was produced, then
padding (0).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.core.task import BOS_ID, EOS_ID, PAD_ID

StepFunction = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def _check(max_length: int, beam_size: int = 1, length_penalty: float = 0.0) -> None:
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
        raise InvalidParameterError(f"`max_length` of decoding must be an int >= 1; found {max_length!r}")
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise InvalidParameterError(f"`beam_size` of beam search must be an int >= 1; found {beam_size!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) or length_penalty < 0:
        raise InvalidParameterError(f"`length_penalty` of beam search must be a number >= 0; found {length_penalty!r}")


def sequence_score(log_probability: float, length: int, length_penalty: float) -> float:
    """Summed log-probability / length^length_penalty."""
    return log_probability / max(length, 1) ** length_penalty


def score_sequence(step: StepFunction, state: Tensor, tokens: list[int], *, length_penalty: float = 1.0,
                   bos: int = BOS_ID) -> float:
    """The length-normalised score of one given sequence (one row of ``state``) under ``step``."""
    total, previous = 0.0, torch.tensor([bos])
    for token in tokens:
        log_probs, state = step(previous, state)
        total += float(log_probs[0, token])
        previous = torch.tensor([token])
    return sequence_score(total, len(tokens), length_penalty)


@torch.no_grad()
def greedy_decode(step: StepFunction, state: Tensor, *, max_length: int, bos: int = BOS_ID, eos: int = EOS_ID) -> Tensor:
    """The most likely token at every step, for every row of ``state`` at once."""
    _check(max_length)
    batch = state.shape[0]
    out = torch.full((batch, max_length), PAD_ID, dtype=torch.long, device=state.device)
    previous = torch.full((batch,), bos, dtype=torch.long, device=state.device)
    done = torch.zeros(batch, dtype=torch.bool, device=state.device)
    for t in range(max_length):
        log_probs, state = step(previous, state)
        previous = log_probs.argmax(-1)
        out[:, t] = torch.where(done, torch.full_like(previous, PAD_ID), previous)
        done |= previous == eos
        if bool(done.all()):
            break
    return out


@torch.no_grad()
def beam_search(step: StepFunction, state: Tensor, *, beam_size: int, max_length: int, length_penalty: float = 1.0,
                bos: int = BOS_ID, eos: int = EOS_ID) -> tuple[Tensor, Tensor]:
    """The best-scoring sequence of each row of ``state`` found by a beam of ``beam_size``.

    Each step extends the live hypotheses by every token and keeps the ``beam_size`` best by
    summed log-probability; a candidate ending in EOS among those best is set aside as finished.
    A row stops when ``beam_size`` hypotheses have finished, or at ``max_length`` (the live ones
    then count as finished, without EOS). The answer is the finished hypothesis with the best
    length-normalised score. With ``beam_size=1`` this is the greedy sequence.

    Returns the ids (B, max_length) and the scores (B,).
    """
    _check(max_length, beam_size, length_penalty)
    ids = torch.full((state.shape[0], max_length), PAD_ID, dtype=torch.long)
    scores = torch.empty(state.shape[0])
    for row in range(state.shape[0]):
        tokens, scores[row] = _beam_row(step, state[row:row + 1], beam_size, max_length, length_penalty, bos, eos)
        ids[row, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
    return ids.to(state.device), scores


def _beam_row(step: StepFunction, state: Tensor, beam_size: int, max_length: int, length_penalty: float, bos: int,
              eos: int) -> tuple[list[int], float]:
    alive: list[list[int]] = [[]]
    alive_log_probs = torch.zeros(1, device=state.device)
    previous = torch.tensor([bos], device=state.device)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_length):
        log_probs, new_state = step(previous, state)
        vocabulary = log_probs.shape[1]
        total = (alive_log_probs[:, None] + log_probs.float()).flatten()
        values, indices = total.topk(min(2 * beam_size, total.numel()))
        kept: list[tuple[int, int, float]] = []  # (source hypothesis, token, summed log-probability)
        for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist())):
            source, token = divmod(index, vocabulary)
            if token == eos:
                if rank < beam_size:  # an ending outside the best beam_size is not a beam member
                    sequence = [*alive[source], token]
                    finished.append((sequence_score(value, len(sequence), length_penalty), sequence))
                continue
            kept.append((source, token, value))
            if len(kept) == beam_size:
                break
        if len(finished) >= beam_size or not kept:
            break
        sources = torch.tensor([k[0] for k in kept], device=state.device)
        alive = [[*alive[s], t] for s, t, _ in kept]
        alive_log_probs = torch.tensor([v for _, _, v in kept], device=state.device)
        previous = torch.tensor([t for _, t, _ in kept], device=state.device)
        state = new_state[sources]
    else:
        finished.extend((sequence_score(v, len(seq), length_penalty), seq) for seq, v in zip(alive, alive_log_probs.tolist()))
    score, best = max(finished, key=lambda f: f[0])
    return best, score
