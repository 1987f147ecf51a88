"""p-tuning's macro-F1 is scikit-learn's, with the numbers fedllm reported before it (hand-written) on every case."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedllm.training.hf.ptuning import macro_f1

LABELS = ["negative", "neutral", "positive"]


def _hand_written(predictions: list[str], truths: list[str], labels: list[str]) -> float:
    """The macro-F1 fedllm computed before scikit-learn (main before this change), kept here as the reference."""
    scores = []
    for label in labels:
        tp = sum(p == label and t == label for p, t in zip(predictions, truths, strict=True))
        fp = sum(p == label and t != label for p, t in zip(predictions, truths, strict=True))
        fn = sum(p != label and t == label for p, t in zip(predictions, truths, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / max(1, len(scores))


@pytest.mark.parametrize(
    ("predictions", "truths", "expected"),
    [
        # neutral never true nor predicted (only in the training set): it counts 0, so a perfect run scores 2/3
        (["positive", "negative"], ["positive", "negative"], 2 / 3),
        # "the" is a generated word that is no label: a miss for positive's recall, nobody's false positive
        (["positive", "the", "negative", "negative"], ["positive", "neutral", "negative", "positive"], 4 / 9),
        # nothing generated at all
        (["", "", ""], ["positive", "positive", "neutral"], 0.0),
        ([], [], 0.0),
    ],
)
def test_macro_f1_keeps_the_numbers_on_missing_and_unseen_labels(predictions, truths, expected) -> None:
    assert macro_f1(predictions, truths, LABELS) == pytest.approx(expected)
    assert macro_f1(predictions, truths, LABELS) == pytest.approx(_hand_written(predictions, truths, LABELS))


words = st.sampled_from([*LABELS, "", "the", "Positive"])  # labels, and what a model may generate instead


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    pairs=st.lists(st.tuples(words, st.sampled_from(LABELS)), max_size=12),
    labels=st.lists(st.sampled_from(LABELS), min_size=0, max_size=3, unique=True),
)
def test_macro_f1_equals_the_hand_written_one(pairs, labels) -> None:
    predictions, truths = [p for p, _ in pairs], [t for _, t in pairs]
    assert macro_f1(predictions, truths, labels) == pytest.approx(_hand_written(predictions, truths, labels))
