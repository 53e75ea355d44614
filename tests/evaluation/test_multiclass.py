"""Single-label scores equal scikit-learn (and torchmetrics) on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from vittune.evaluation.report import build_report


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def random_case(n: int, k: int, seed: int, present: int | None = None):
    """Probabilities with some signal; targets drawn from the first `present` classes."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, present or k, size=n)
    logits = rng.normal(size=(n, k)) * 2.0
    logits[np.arange(n), targets] += 1.5
    return softmax(logits), targets


def one_class_case():
    probs, _ = random_case(30, 4, seed=3)
    return probs, np.zeros(30, dtype=np.int64)


def perfect_case():
    targets = np.repeat(np.arange(4), 5)
    logits = np.full((20, 4), -3.0)
    logits[np.arange(20), targets] = 3.0
    return softmax(logits), targets


def never_predicted_absent_case():
    """Class 3 is neither a target nor ever predicted: its F1 is undefined."""
    probs, targets = random_case(40, 3, seed=4)
    probs = np.concatenate([probs * 0.99, np.full((40, 1), 0.01)], axis=1)
    return probs, targets


CASES = {
    "random_k7": lambda: random_case(300, 7, seed=0),
    "random_k3": lambda: random_case(100, 3, seed=1),
    "binary": lambda: random_case(80, 2, seed=2),
    "class_absent": lambda: random_case(120, 7, seed=5, present=6),
    "absent_never_predicted": never_predicted_absent_case,
    "one_class": one_class_case,
    "perfect": perfect_case,
}


def specificity_from_confusion(counts: np.ndarray) -> np.ndarray:
    """tn / (tn + fp) per class, written out from a confusion matrix."""
    out = []
    for k in range(len(counts)):
        tp = counts[k, k]
        fp = counts[:, k].sum() - tp
        fn = counts[k, :].sum() - tp
        tn = counts.sum() - tp - fp - fn
        out.append(tn / (tn + fp) if tn + fp else np.nan)
    return np.array(out)


@pytest.mark.parametrize("case", CASES)
def test_scores_equal_sklearn(case: str) -> None:
    probs, targets = CASES[case]()
    k = probs.shape[1]
    labels = list(range(k))
    classes = [f"c{i}" for i in labels]
    preds = probs.argmax(axis=1)
    report = build_report(probs, targets, classes)
    overall, table = report.overall, report.per_class

    assert overall["acc1"] == pytest.approx(accuracy_score(targets, preds))
    if k > 5:
        expected = top_k_accuracy_score(targets, probs, k=5, labels=labels)
        assert overall["acc5"] == pytest.approx(expected)
    else:
        assert "acc5" not in overall
    f1 = f1_score(targets, preds, labels=labels, average="macro", zero_division=np.nan)
    assert overall["f1_macro"] == pytest.approx(f1, nan_ok=True)
    assert overall["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(targets, preds))
    assert overall["log_loss"] == pytest.approx(log_loss(targets, probs, labels=labels))

    precision, recall, f1s, support = precision_recall_fscore_support(
        targets, preds, labels=labels, zero_division=np.nan
    )
    np.testing.assert_allclose(table.precision, precision)  # NaN == NaN here
    np.testing.assert_allclose(table.recall, recall)
    np.testing.assert_allclose(table.f1, f1s)
    np.testing.assert_array_equal(table.support, support)
    counts = confusion_matrix(targets, preds, labels=labels)
    np.testing.assert_array_equal(report.confusion, counts)
    np.testing.assert_allclose(table.specificity, specificity_from_confusion(counts))

    present = np.isin(labels, targets)
    for c in labels:
        expected = (
            roc_auc_score(targets == c, probs[:, c]) if 0 < support[c] < len(targets) else np.nan
        )
        assert table.auroc[c] == pytest.approx(expected, nan_ok=True)
    if not present.all():
        assert np.isnan(overall["auroc_macro"])
        assert any("macro AUROC is undefined" in note for note in report.notes)
    elif k == 2:
        assert overall["auroc_macro"] == pytest.approx(roc_auc_score(targets, probs[:, 1]))
    else:
        expected = roc_auc_score(targets, probs, multi_class="ovr", average="macro", labels=labels)
        assert overall["auroc_macro"] == pytest.approx(expected)

    rates = report.confusion_normalised
    normalised = confusion_matrix(targets, preds, labels=labels, normalize="true")
    np.testing.assert_allclose(rates[present], normalised[present])
    assert np.isnan(rates[~present]).all()  # undefined rows, not sklearn's zeros


def test_edge_cases_have_the_values_and_notes_a_reader_expects() -> None:
    probs, targets = perfect_case()
    report = build_report(probs, targets, list("abcd"))
    for name in ("acc1", "f1_macro", "auroc_macro", "balanced_accuracy"):
        assert report.overall[name] == 1.0
    assert (report.per_class.specificity == 1.0).all()
    assert report.notes == [] and len(report.mistakes) == 0

    probs, targets = one_class_case()
    report = build_report(probs, targets, list("abcd"))
    assert np.isnan(report.per_class.auroc).all()
    assert np.isnan(report.per_class.specificity[0])  # class a is in every sample
    assert np.isnan(report.per_class.recall[1:]).all()
    notes = " ".join(report.notes)
    assert "specificity is undefined (NaN) for class a" in notes
    assert "recall is undefined (NaN) for classes b, c, d" in notes

    probs, targets = never_predicted_absent_case()
    report = build_report(probs, targets, list("abcd"))
    assert np.isnan(report.per_class.f1[3]) and np.isnan(report.per_class.precision[3])
    assert "left out of the macro F1" in " ".join(report.notes)
    assert report.overall["f1_macro"] == pytest.approx(np.mean(report.per_class.f1[:3]))


def test_scores_equal_the_torchmetrics_logged_during_training() -> None:
    probs, targets = random_case(300, 7, seed=6)
    report = build_report(probs, targets, [f"c{i}" for i in range(7)])
    p, t = torch.from_numpy(probs), torch.from_numpy(targets)
    for name, metric in {
        "acc1": MulticlassAccuracy(num_classes=7, average="micro"),
        "acc5": MulticlassAccuracy(num_classes=7, top_k=5, average="micro"),
        "f1_macro": MulticlassF1Score(num_classes=7, average="macro"),
        "auroc_macro": MulticlassAUROC(num_classes=7, average="macro", thresholds=None),
    }.items():
        assert report.overall[name] == pytest.approx(metric(p, t).item(), abs=1e-6), name
