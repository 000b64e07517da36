"""A GRU decoder head for ``generation`` tasks, conditioned on the shared representation z."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from polytask.core.errors import InvalidParameterError, ShapeError
from polytask.core.task import BOS_ID, PAD_ID
from polytask.text.decoding import beam_search, greedy_decode


class GRUGenerator(nn.Module):
    """Generates a token sequence from z, as the explanation decoder of CAML (Chen et al., IJCAI 2019).

    h₀ = tanh(W z + b); at step t, hₜ = GRU([E(yₜ₋₁); c], hₜ₋₁) with c = tanh(W_c z + b_c) the
    same context at every step, and p(yₜ | y<ₜ, z) = softmax(V [hₜ; c] + d). y₀ = BOS.

    - Training (``self.training``, targets given): teacher forcing, the logits of every position
      from the gold tokens before it, (B, T, V).
    - Otherwise: the logits along the greedy path (each step fed its own argmax), (B, T, V), so
      the argmax of the output is the greedy sequence: what metrics and ``predict`` read. The
      task's loss on them (a validation loss) is therefore the free-running cross-entropy, not a
      teacher-forced perplexity: it grows as the decoder grows confident even while the greedy
      texts improve, so pick the best epoch by a text metric (``monitor: NAME/rouge_l``).
    - :meth:`generate`: ids by greedy decoding or by length-normalised beam search.

    The decoding state is [hₜ; c] in one tensor, so beam search can reorder hypotheses by row.

    Departures
    ----------
    - CAML's decoder also reads the rating prediction's embedding (its ``feed_rating`` option)
      and attends over the selected concepts; here the selected concepts reach it only through
      z (initial state and the per-step context c).
    - The output layer reads c beside hₜ (a "deep output" as in Bahdanau et al., ICLR 2015): a
      direct path from z to the words, without which the decoder sat for many steps on the
      words' marginal distribution, ignoring z.
    """

    def __init__(self, in_features: int, vocab_size: int, *, max_length: int, embedding_dim: int = 64,
                 hidden_size: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        for key, value, low in (("in_features", in_features, 1), ("vocab_size", vocab_size, 5), ("max_length", max_length, 1),
                                ("embedding_dim", embedding_dim, 1), ("hidden_size", hidden_size, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise InvalidParameterError(f"`{key}` of GRUGenerator must be an int >= {low}; found {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise InvalidParameterError(f"`dropout` of GRUGenerator must be in [0, 1); found {dropout!r}")
        self.vocab_size, self.max_length, self.hidden_size = vocab_size, max_length, hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=PAD_ID)
        self.initial = nn.Linear(in_features, hidden_size)
        self.context = nn.Linear(in_features, embedding_dim)
        self.cell = nn.GRUCell(2 * embedding_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Linear(hidden_size + embedding_dim, vocab_size)

    def start(self, z: Tensor) -> Tensor:
        """The decoding state [h₀; c] (B, hidden_size + embedding_dim)."""
        return torch.cat([torch.tanh(self.initial(z)), torch.tanh(self.context(z))], dim=1)

    def _advance(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        h, c = state[:, :self.hidden_size], state[:, self.hidden_size:]
        h = self.cell(torch.cat([self.embedding(tokens), c], dim=1), h)
        return self.output(self.dropout(torch.cat([h, c], dim=1))), torch.cat([h, c], dim=1)

    def step(self, tokens: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """The decoding step: log-probabilities of the next token (N, V) and the new state."""
        logits, state = self._advance(tokens, state)
        return torch.log_softmax(logits.float(), dim=-1), state

    def teacher_forced(self, z: Tensor, target: Tensor) -> Tensor:
        """(B, T, V) logits of each target position given the gold tokens before it."""
        if target.dim() != 2 or target.shape[0] != z.shape[0]:
            raise ShapeError(f"teacher-forcing tokens must be (batch={z.shape[0]}, length); found {tuple(target.shape)}")
        inputs = torch.cat([torch.full_like(target[:, :1], BOS_ID), target[:, :-1]], dim=1)
        state, logits = self.start(z), []
        for t in range(inputs.shape[1]):
            out, state = self._advance(inputs[:, t], state)
            logits.append(out)
        return torch.stack(logits, dim=1)

    def free_running(self, z: Tensor, length: int | None = None) -> Tensor:
        """(B, T, V) logits along the greedy path: each step reads the previous step's argmax."""
        state = self.start(z)
        previous = torch.full((z.shape[0],), BOS_ID, dtype=torch.long, device=z.device)
        logits = []
        for _ in range(length or self.max_length):
            out, state = self._advance(previous, state)
            logits.append(out)
            previous = out.argmax(-1)
        return torch.stack(logits, dim=1)

    def forward(self, z: Tensor, target: Tensor | None = None) -> Tensor:
        if self.training and target is not None:
            return self.teacher_forced(z, target)
        return self.free_running(z, None if target is None else target.shape[1])

    @torch.no_grad()
    def generate(self, z: Tensor, *, beam_size: int = 1, length_penalty: float = 1.0, max_length: int | None = None) -> Tensor:
        """(B, max_length) ids: greedy when ``beam_size`` is 1, else beam search."""
        length = max_length or self.max_length
        if beam_size == 1:
            return greedy_decode(self.step, self.start(z), max_length=length)
        return beam_search(self.step, self.start(z), beam_size=beam_size, max_length=length,
                           length_penalty=length_penalty)[0]
