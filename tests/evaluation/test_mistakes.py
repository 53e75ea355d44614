"""Confident mistakes: wrong predictions only, the most confident first."""

from __future__ import annotations

import numpy as np

from vittune.evaluation.mistakes import confident_mistakes


def test_single_label_ranks_wrong_predictions_by_their_probability() -> None:
    probs = np.array(
        [
            [0.9, 0.1, 0.0],  # right
            [0.2, 0.7, 0.1],  # wrong, 0.7
            [0.1, 0.1, 0.8],  # wrong, 0.8
            [0.5, 0.4, 0.1],  # wrong, 0.5
            [0.2, 0.7, 0.1],  # wrong, 0.7: tie with sample 1, keeps sample order
        ]
    )
    targets = np.array([0, 0, 1, 2, 2])
    np.testing.assert_array_equal(confident_mistakes(probs, targets), [2, 1, 4, 3])
    np.testing.assert_array_equal(confident_mistakes(probs, targets, limit=2), [2, 1])
    assert len(confident_mistakes(probs, probs.argmax(axis=1))) == 0


def test_multi_label_ranks_by_the_most_confident_wrong_decision() -> None:
    probs = np.array(
        [
            [0.9, 0.2],  # right
            [0.6, 0.1],  # label 0 false positive at 0.6
            [0.9, 0.05],  # label 1 false negative, confidence 0.95
            [0.3, 0.45],  # label 1 false negative, confidence 0.55
        ]
    )
    targets = np.array([[1, 0], [0, 0], [1, 1], [0, 1]])
    ranked = confident_mistakes(probs, targets, threshold=np.array([0.5, 0.5]))
    np.testing.assert_array_equal(ranked, [2, 1, 3])
    # a lower threshold for label 1 turns sample 3 into a right answer
    ranked = confident_mistakes(probs, targets, threshold=np.array([0.5, 0.4]))
    np.testing.assert_array_equal(ranked, [2, 1])
