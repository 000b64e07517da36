"""The Trainer-vs-hand-loop bench compares like with like: both loops train the same model on the
same batches and report the same epoch-end values."""

from __future__ import annotations

import math

import pytest

from polytask.bench import overhead


def test_hand_loop_reports_what_the_trainer_reports() -> None:
    result = overhead.run(repeats=1, clock="cpu", echo=lambda line: None)
    assert result.steps > 0 and result.hand_ms > 0 and result.trainer_ms > 0
    hand, trainer = result.hand_report, result.trainer_report
    assert set(hand) == set(trainer) == {"income", "marital"}
    for task, values in hand.items():
        # every value the Trainer logs for the epoch except the method's weight, which a plain sum has none of
        assert set(values) == set(trainer[task]) - {"weight"}
        # same model, optimiser, batches and update: the predictions, so the metrics, are the same
        for metric in ("accuracy", "f1", "auroc"):
            assert values[metric] == trainer[task][metric], (task, metric)
        # the hand loop averages batch losses; the Trainer weights each by its rows (the last batch is smaller)
        assert math.isclose(values["loss"], trainer[task]["loss"], rel_tol=1e-2)


def test_unknown_clock_is_refused() -> None:
    from polytask.core.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="`clock` must be one of wall, cpu"):
        overhead.run(repeats=1, clock="gpu")
