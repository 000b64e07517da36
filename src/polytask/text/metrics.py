"""BLEU and ROUGE of generated token sequences, by sacrebleu and rouge-score (``polytask[text]``).

A metric's ``update`` receives the head's logits (N, T, V) and the target ids (N, T). The predicted
sequence is the argmax at each position (the greedy decoding a generator head returns in eval
mode), cut at its first EOS; the reference is the target's ids before EOS. Sequences are scored as
space-joined id strings ("17 402 9"): the vocabulary maps one word to one id, so n-gram matches
of ids are n-gram matches of words, and the scores equal those of the decoded words (unknown
words all become id 1, as the vocabulary's texts do).

- ``bleu``: sacrebleu's corpus BLEU (Papineni et al., ACL 2002; Post, WMT 2018) with its
  defaults (4-grams, brevity penalty, exponential smoothing) and ``tokenize="none"``, on 0–100;
- ``rouge_1``, ``rouge_2``, ``rouge_l``: rouge-score's F-measure (Lin, 2004) per text, averaged over
  the texts, on 0–1, with whitespace tokenisation (no stemming).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import torch
import torchmetrics
from torch import Tensor

from polytask.core.errors import InvalidParameterError
from polytask.core.task import EOS_ID, PAD_ID

INSTALL = "pip install 'polytask[text]'"


def require(module: str) -> Any:
    """Import an optional package of the text extra, or say how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"{module} is needed for BLEU/ROUGE of generation tasks: {INSTALL}") from exc


def strip(ids: Sequence[int]) -> list[int]:
    """The ids before the first EOS, without padding."""
    out = []
    for i in ids:
        if i == EOS_ID:
            break
        if i != PAD_ID:
            out.append(int(i))
    return out


def as_text(ids: Sequence[int]) -> str:
    return " ".join(str(i) for i in strip(ids))


class _WhitespaceTokenizer:
    """rouge-score's tokenizer interface: split on spaces (its default drops non-alphanumerics)."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return text.split()


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """sacrebleu's corpus BLEU (0–100) of pre-tokenised texts, one reference each."""
    sacrebleu = require("sacrebleu")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)], tokenize="none").score)


def mean_rouge(hypotheses: Sequence[str], references: Sequence[str], kind: str) -> float:
    """Mean over texts of rouge-score's F-measure for ``kind`` (rouge1, rouge2, rougeL)."""
    scorer = require("rouge_score.rouge_scorer").RougeScorer([kind], use_stemmer=False, tokenizer=_WhitespaceTokenizer())
    if not hypotheses:
        return float("nan")
    return sum(scorer.score(ref, hyp)[kind].fmeasure for hyp, ref in zip(hypotheses, references)) / len(hypotheses)


class _SequenceMetric(torchmetrics.Metric):
    """Keeps the predicted and reference id sequences; scores them in ``compute``."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("predicted", default=[], dist_reduce_fx="cat")
        self.add_state("reference", default=[], dist_reduce_fx="cat")

    def update(self, logits: Tensor, target: Tensor) -> None:
        ids = logits.argmax(-1) if logits.dim() == 3 else logits
        self.predicted.append(ids.long().cpu())
        self.reference.append(target.long().cpu())

    def texts(self) -> tuple[list[str], list[str]]:
        if not self.predicted:
            return [], []
        # rows of batches of different lengths: pad to the longest before joining
        width = max(t.shape[1] for t in [*self.predicted, *self.reference])
        pad = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in self.predicted]
        ref = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in self.reference]
        return ([as_text(r) for r in torch.cat(pad).tolist()], [as_text(r) for r in torch.cat(ref).tolist()])


class BLEU(_SequenceMetric):
    """sacrebleu corpus BLEU (0–100) of the argmax sequences against the targets."""

    higher_is_better = True

    def compute(self) -> Tensor:
        hypotheses, references = self.texts()
        return torch.tensor(corpus_bleu(hypotheses, references), dtype=torch.float64)


class ROUGE(_SequenceMetric):
    """rouge-score F-measure (rouge1, rouge2 or rougeL), averaged over texts."""

    higher_is_better = True

    def __init__(self, kind: str) -> None:
        if kind not in ("rouge1", "rouge2", "rougeL"):
            raise InvalidParameterError(f"`kind` of ROUGE must be rouge1, rouge2 or rougeL; found {kind!r}")
        super().__init__()
        self.kind = kind

    def compute(self) -> Tensor:
        hypotheses, references = self.texts()
        return torch.tensor(mean_rouge(hypotheses, references, self.kind), dtype=torch.float64)
