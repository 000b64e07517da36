"""Text tasks: the ``generation`` kind (a token sequence per sample).

- :mod:`~polytask.text.losses`: ``token_ce``, token cross-entropy over non-padding positions
  (teacher forcing happens in the head);
- :mod:`~polytask.text.generator`: :class:`GRUGenerator`, a GRU decoder head on z;
- :mod:`~polytask.text.decoding`: greedy decoding and length-normalised beam search of any step
  function;
- :mod:`~polytask.text.metrics`: BLEU (sacrebleu) and ROUGE-1/2/L (rouge-score) on token ids;
- :mod:`~polytask.text.vocabulary`: the reserved ids (pad 0, unk 1, BOS 2, EOS 3), encoding texts
  to target rows and decoding ids back to strings.

Importing this package registers the kind's loss in ``polytask.core.LOSSES`` (core loads it by
name on first need). It imports only ``polytask.core``, ``polytask.data`` and torch; sacrebleu and
rouge-score are imported when a score is computed (``pip install 'polytask[text]'``).
"""

from __future__ import annotations

from polytask.text import losses  # noqa: F401  (registers the loss)
from polytask.text.decoding import beam_search, greedy_decode, score_sequence, sequence_score
from polytask.text.generator import GRUGenerator
from polytask.text.vocabulary import BOS, EOS, decode_ids, encode_targets, generation_vocabulary

__all__ = ["BOS", "EOS", "GRUGenerator", "beam_search", "decode_ids", "encode_targets", "generation_vocabulary",
           "greedy_decode", "score_sequence", "sequence_score"]
