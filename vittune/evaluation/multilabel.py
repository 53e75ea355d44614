"""Scores of a multi-label classifier (one sigmoid per label), computed by scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    hamming_loss,
    log_loss,
    multilabel_confusion_matrix,
    precision_recall_fscore_support,
)

from vittune.evaluation.scores import (
    PerClass,
    Scores,
    binary_auroc,
    macro_auroc,
    specificity,
    undefined_notes,
)


def decide(probs: np.ndarray, threshold: np.ndarray) -> np.ndarray:
    """[N, K] 0/1 decisions: p > threshold, strictly, as torchmetrics does during training."""
    return (probs > threshold).astype(np.int64)


def multilabel_scores(
    probs: np.ndarray, targets: np.ndarray, classes: list[str], threshold: np.ndarray
) -> Scores:
    """Per-label and macro F1/AUROC, subset accuracy, Hamming loss and mean binary log loss.

    Args:
        probs: [N, K] sigmoid probabilities.
        targets: [N, K] 0/1 indicators.
        classes: K label names.
        threshold: [K] per-label decision thresholds.
    """
    preds = decide(probs, threshold)  # [N, K]
    counts = multilabel_confusion_matrix(targets, preds)  # [K, 2, 2]: [[tn, fp], [fn, tp]]
    tn, fp = counts[:, 0, 0], counts[:, 0, 1]
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, average=None, zero_division=np.nan
    )
    auroc = np.array([binary_auroc(targets[:, k], probs[:, k]) for k in range(len(classes))])
    table = PerClass(
        names=list(classes),
        precision=precision,
        recall=recall,
        specificity=specificity(tn, fp),
        f1=f1,
        auroc=auroc,
        support=support,
    )
    notes = undefined_notes(table, "label")
    overall = {
        "subset_accuracy": float(accuracy_score(targets, preds)),
        "hamming_loss": float(hamming_loss(targets, preds)),
        # sklearn leaves NaN (undefined) labels out of the macro average; NaN only if all are.
        "f1_macro": float(f1_score(targets, preds, average="macro", zero_division=np.nan)),
    }
    overall["auroc_macro"], auroc_notes = macro_auroc(table, "label")
    notes += auroc_notes
    # Mean binary cross-entropy over every (sample, label): the BCE loss used in training.
    overall["log_loss"] = float(log_loss(targets.ravel(), probs.ravel(), labels=[0, 1]))
    return Scores(overall=overall, per_class=table, confusion=counts, notes=notes)
