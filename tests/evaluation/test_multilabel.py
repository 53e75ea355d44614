"""Multi-label scores equal scikit-learn on the same predictions, per label and macro."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    hamming_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)

from vittune.evaluation.report import build_report


def random_case(n: int = 200, k: int = 4, seed: int = 0, empty_label: bool = False):
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, k)) < 0.35).astype(np.int64)
    if empty_label:
        targets[:, -1] = 0
    probs = np.clip(0.35 * targets + rng.random((n, k)) * 0.65, 0.0, 1.0)
    return probs, targets


def perfect_case():
    targets = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    return np.where(targets == 1, 0.9, 0.1), targets


CASES = {
    "random": lambda: random_case(),
    "all_zero_label": lambda: random_case(empty_label=True, seed=1),
    "perfect": perfect_case,
}


@pytest.mark.parametrize("threshold", [0.5, [0.3, 0.5, 0.7]])
@pytest.mark.parametrize("case", CASES)
def test_scores_equal_sklearn(case: str, threshold) -> None:
    probs, targets = CASES[case]()
    k = targets.shape[1]
    threshold = threshold if np.isscalar(threshold) else threshold[:k] + [0.5] * (k - 3)
    report = build_report(probs, targets, [f"l{i}" for i in range(k)], threshold=threshold)
    preds = (probs > np.asarray(threshold)).astype(int)  # strictly above, as torchmetrics
    overall, table = report.overall, report.per_class

    assert overall["subset_accuracy"] == pytest.approx(accuracy_score(targets, preds))
    assert overall["hamming_loss"] == pytest.approx(hamming_loss(targets, preds))
    f1 = f1_score(targets, preds, average="macro", zero_division=np.nan)
    assert overall["f1_macro"] == pytest.approx(f1)
    bce = -np.mean(targets * np.log(probs) + (1 - targets) * np.log(1 - probs))
    assert overall["log_loss"] == pytest.approx(bce)

    precision, recall, f1s, support = precision_recall_fscore_support(
        targets, preds, average=None, zero_division=np.nan
    )
    np.testing.assert_allclose(table.precision, precision)
    np.testing.assert_allclose(table.recall, recall)
    np.testing.assert_allclose(table.f1, f1s)
    np.testing.assert_array_equal(table.support, support)
    counts = multilabel_confusion_matrix(targets, preds)
    np.testing.assert_array_equal(report.confusion, counts)
    tn, fp = counts[:, 0, 0], counts[:, 0, 1]
    np.testing.assert_allclose(table.specificity, tn / (tn + fp))

    defined = targets.min(axis=0) != targets.max(axis=0)  # [K] both 0 and 1 occur
    expected = np.full(k, np.nan)
    expected[defined] = roc_auc_score(targets[:, defined], probs[:, defined], average=None)
    np.testing.assert_allclose(table.auroc, expected)
    if defined.all():
        expected = roc_auc_score(targets, probs, average="macro")
        assert overall["auroc_macro"] == pytest.approx(expected)
    else:
        assert np.isnan(overall["auroc_macro"])
        assert "no ROC curve for l3" in " ".join(report.notes)
    assert set(report.roc) == {f"l{i}" for i in range(k) if defined[i]}
    assert report.reliability is None and "ece" not in overall


def test_all_zero_label_is_nan_not_zero() -> None:
    probs, targets = random_case(empty_label=True, seed=2)
    probs[:, -1] = 0.1  # never predicted either: F1 undefined, left out of the macro
    report = build_report(probs, targets, list("abcd"))
    assert np.isnan(report.per_class.recall[-1]) and np.isnan(report.per_class.f1[-1])
    assert report.overall["f1_macro"] == pytest.approx(np.mean(report.per_class.f1[:3]))
    assert "f1 is undefined (NaN) for label d" in " ".join(report.notes)
