"""ROC points are scikit-learn's roc_curve for the positive class or for each label."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve

from vittune.evaluation.roc import roc_curves


def test_binary_curve_is_that_of_the_second_class() -> None:
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 60)
    p1 = np.clip(0.3 * targets + 0.7 * rng.random(60), 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    curves, notes = roc_curves(probs, targets, ["benign", "malignant"])
    assert list(curves) == ["malignant"] and notes == []
    fpr, tpr, thresholds = roc_curve(targets, p1)
    curve = curves["malignant"]
    np.testing.assert_array_equal(curve.fpr, fpr)
    np.testing.assert_array_equal(curve.tpr, tpr)
    np.testing.assert_array_equal(curve.thresholds, thresholds)
    assert curve.auc == roc_auc_score(targets, p1)


def test_one_curve_per_label_and_none_for_a_label_without_positives() -> None:
    rng = np.random.default_rng(1)
    targets = (rng.random((50, 3)) < 0.4).astype(int)
    targets[:, 1] = 0
    probs = rng.random((50, 3))
    curves, notes = roc_curves(probs, targets, ["a", "b", "c"])
    assert list(curves) == ["a", "c"]
    assert notes == ["no ROC curve for b: only positives or only negatives in the targets"]
    for k, name in [(0, "a"), (2, "c")]:
        fpr, tpr, _ = roc_curve(targets[:, k], probs[:, k])
        np.testing.assert_array_equal(curves[name].fpr, fpr)
        np.testing.assert_array_equal(curves[name].tpr, tpr)
        assert curves[name].auc == roc_auc_score(targets[:, k], probs[:, k])


def test_one_vs_rest_curves_for_more_than_two_classes() -> None:
    """Each class against the rest, as scikit-learn computes it on the binarised targets."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(3), size=40)  # [40, 3]
    targets = rng.integers(0, 3, size=40)
    curves, notes = roc_curves(probs, targets, ["a", "b", "c"])
    assert list(curves) == ["a", "b", "c"] and notes == []
    for k, name in enumerate("abc"):
        fpr, tpr, _ = roc_curve(targets == k, probs[:, k])
        np.testing.assert_array_equal(curves[name].fpr, fpr)
        np.testing.assert_array_equal(curves[name].tpr, tpr)
        assert curves[name].auc == roc_auc_score(targets == k, probs[:, k])
