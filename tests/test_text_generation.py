"""The generation kind: decoding, token loss, BLEU/ROUGE against their packages, target checks."""

from __future__ import annotations

import math
import sys

import pytest
import torch

import polytask as pt
from polytask.core.errors import DataError
from polytask.core.task import BOS_ID, EOS_ID
from polytask.metrics.registry import METRICS
from polytask.text import GRUGenerator, beam_search, decode_ids, encode_targets, generation_vocabulary, greedy_decode
from polytask.text.decoding import score_sequence
from polytask.text.losses import token_cross_entropy
from polytask.text.metrics import BLEU, ROUGE, corpus_bleu

sacrebleu = pytest.importorskip("sacrebleu")
rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")


def markov_step(table: torch.Tensor):
    """A step function whose next-token distribution depends only on the previous token."""
    log_table = table.clamp(min=1e-9).log()

    def step(tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return log_table[tokens], state
    return step


def test_beam_of_one_is_greedy_on_a_trained_size_generator():
    torch.manual_seed(0)
    generator = GRUGenerator(16, 30, max_length=9, embedding_dim=8, hidden_size=12).eval()
    with torch.no_grad():  # sharpen the output layer so sequences differ between rows and end at various lengths
        generator.output.weight.mul_(8.0)
    z = torch.randn(12, 16)
    greedy = generator.generate(z, beam_size=1)
    beam, _ = beam_search(generator.step, generator.start(z), beam_size=1, max_length=9)
    assert torch.equal(beam, greedy)
    assert len({tuple(r) for r in greedy.tolist()}) > 3  # not a degenerate all-equal case
    # eval-mode output of the head is the greedy path: its argmax is the same sequence up to EOS
    argmax = generator(z).argmax(-1)
    for row_greedy, row_argmax in zip(greedy.tolist(), argmax.tolist()):
        length = row_greedy.index(EOS_ID) + 1 if EOS_ID in row_greedy else len(row_greedy)
        assert row_argmax[:length] == row_greedy[:length]


def test_beam_finds_a_better_sequence_than_greedy():
    # ids: 0 pad, 1 unk, 2 BOS, 3 EOS, 4 "a", 5 "b". Greedy takes "a" (0.6) and then ends (0.35): mean
    # log-probability (ln .6 + ln .35)/2 = -0.78; "b" (0.4) then EOS (0.95) scores -0.48.
    table = torch.zeros(6, 6)
    table[BOS_ID, 4], table[BOS_ID, 5] = 0.6, 0.4
    table[4, EOS_ID], table[4, 4], table[4, 5] = 0.35, 0.33, 0.32
    table[5, EOS_ID], table[5, 4] = 0.95, 0.05
    table[EOS_ID, EOS_ID] = table[0, 0] = table[1, 1] = 1.0
    step, state = markov_step(table), torch.zeros(1, 1)
    greedy = greedy_decode(step, state, max_length=5)[0].tolist()
    beam, score = beam_search(step, state, beam_size=2, max_length=5, length_penalty=1.0)
    assert greedy[:2] == [4, EOS_ID]
    assert beam[0].tolist()[:2] == [5, EOS_ID]
    greedy_score = score_sequence(step, state, [4, EOS_ID])
    assert score_sequence(step, state, [5, EOS_ID]) == pytest.approx(float(score[0]))
    assert float(score[0]) == pytest.approx((math.log(0.4) + math.log(0.95)) / 2, abs=1e-6)
    assert float(score[0]) > greedy_score + 0.2


def test_length_penalty_decides_between_a_short_and_a_long_sequence():
    # "b" EOS: sum ln .5 + ln .9 = -0.80 (mean -0.40); "a a a a": ln .5 + 3 ln .8 = -1.36 (mean -0.34)
    table = torch.zeros(6, 6)
    table[BOS_ID, 4], table[BOS_ID, 5] = 0.5, 0.5
    table[4, 4], table[4, 1] = 0.8, 0.2
    table[5, EOS_ID], table[5, 1] = 0.9, 0.1
    table[1, 1] = table[EOS_ID, EOS_ID] = 1.0
    step, state = markov_step(table), torch.zeros(1, 1)
    raw, raw_score = beam_search(step, state, beam_size=2, max_length=4, length_penalty=0.0)
    assert raw[0].tolist() == [5, EOS_ID, 0, 0]
    assert float(raw_score[0]) == pytest.approx(math.log(0.5) + math.log(0.9), abs=1e-6)
    mean, mean_score = beam_search(step, state, beam_size=2, max_length=4, length_penalty=1.0)
    assert mean[0].tolist() == [4, 4, 4, 4]  # reached max_length without EOS
    assert float(mean_score[0]) == pytest.approx((math.log(0.5) + 3 * math.log(0.8)) / 4, abs=1e-6)


def test_teacher_forcing_is_causal_and_the_loss_ignores_padding():
    torch.manual_seed(1)
    generator = GRUGenerator(6, 20, max_length=5, embedding_dim=4, hidden_size=8).train()
    z = torch.randn(3, 6)
    target = torch.tensor([[5, 6, EOS_ID, 0, 0], [7, EOS_ID, 0, 0, 0], [8, 9, 10, 11, EOS_ID]])
    logits = generator(z, target)
    changed = target.clone()
    changed[0, 1] = 12
    again = generator(z, changed)
    assert torch.allclose(logits[0, :2], again[0, :2]) and not torch.allclose(logits[0, 2], again[0, 2])
    loss = token_cross_entropy(logits, target)
    real = target != 0
    manual = -torch.log_softmax(logits, -1).gather(2, target[..., None]).squeeze(2)[real].mean()
    assert loss.item() == pytest.approx(manual.item(), rel=1e-6)
    noisy = logits.detach().clone()
    noisy[~real] = torch.randn_like(noisy[~real]) * 100  # whatever the head says at padding positions
    assert token_cross_entropy(noisy, target).item() == pytest.approx(loss.item(), rel=1e-6)
    task = pt.Task("title", kind="generation", num_classes=20)
    assert task.loss(logits, target).item() == pytest.approx(loss.item(), rel=1e-6)


HYPOTHESES = ["the cat sat on the mat today", "a very nice dress for summer", "love it", "runs small in the waist"]
REFERENCES = ["the cat sat on the mat", "a nice dress for the summer", "love this top", "runs small in the hips and waist"]


def _ids(texts, vocab, length=12):
    return encode_targets(texts, vocab, length, task="title")


def test_bleu_and_rouge_on_ids_equal_the_packages_on_words():
    vocab = generation_vocabulary(HYPOTHESES + REFERENCES, min_frequency=1)
    hyp, ref = _ids(HYPOTHESES, vocab), _ids(REFERENCES, vocab)
    logits = torch.nn.functional.one_hot(hyp, len(vocab)).float()
    bleu = BLEU()
    bleu.update(logits, ref)
    expected = sacrebleu.corpus_bleu(HYPOTHESES, [REFERENCES]).score
    assert expected > 10  # a case with 4-gram matches, not a zero
    assert float(bleu.compute()) == pytest.approx(expected, abs=1e-9)
    for kind, name in (("rouge1", "rouge_1"), ("rouge2", "rouge_2"), ("rougeL", "rouge_l")):
        scorer = rouge_scorer.RougeScorer([kind])
        expected = sum(scorer.score(r, h)[kind].fmeasure for h, r in zip(HYPOTHESES, REFERENCES)) / len(HYPOTHESES)
        metric = ROUGE(kind)
        metric.update(logits[:2], ref[:2])  # two updates: the state accumulates
        metric.update(logits[2:], ref[2:])
        assert float(metric.compute()) == pytest.approx(expected, abs=1e-12)
        assert name in METRICS.for_kind("generation")
    assert decode_ids(hyp, vocab) == HYPOTHESES


def test_generation_targets_are_checked_by_row_and_position():
    task = pt.Task("title", kind="generation", num_classes=10)
    task.check_targets(torch.tensor([[4, EOS_ID, 0], [5, 6, EOS_ID]]))
    with pytest.raises(DataError, match=r"task 'title': row 1, position 2 holds token id 12; expected an id in \[0, 9\]"):
        task.check_targets(torch.tensor([[4, EOS_ID, 0], [5, 6, 12]]))
    with pytest.raises(DataError, match=r"row 0, position 0 holds token id -1"):
        task.check_targets(torch.tensor([[-1, EOS_ID, 0]]))
    with pytest.raises(DataError, match=r"row 1 is empty"):
        task.check_targets(torch.tensor([[4, EOS_ID, 0], [0, 0, 0]]))
    with pytest.raises(DataError, match=r"shape \(n, T\)"):
        task.check_targets(torch.tensor([4, EOS_ID]))
    with pytest.raises(pt.core.errors.InvalidParameterError, match="num_classes"):
        pt.Task("title", kind="generation")
    with pytest.raises(pt.core.errors.ShapeError, match=r"expected \(batch, length, 10\)"):
        task.prepare_prediction(torch.zeros(2, 3, 9))


def test_empty_texts_are_refused_with_the_task_and_row():
    vocab = generation_vocabulary(["love it"], min_frequency=1)
    for empty in ("   ", None, float("nan")):
        with pytest.raises(DataError, match=r"generation task 'title': text of row 1 is empty"):
            encode_targets(["love it", empty], vocab, 4, task="title")
    ids = encode_targets(["love it love it love", "it ?!"], vocab, 4, task="title")
    assert ids.tolist() == [[vocab.index["love"], vocab.index["it"], vocab.index["love"], EOS_ID],
                            [vocab.index["it"], 1, 1, EOS_ID]]  # unknown words are id 1, not nothing
    assert BOS_ID == vocab.index["<bos>"]


def test_a_missing_metrics_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)  # what an uninstalled package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'polytask\[text\]'"):
        corpus_bleu(["1 2"], ["1 2"])
