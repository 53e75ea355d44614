"""Scores of a single-label classifier from its probabilities, computed by scikit-learn."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from vittune.evaluation.scores import (
    PerClass,
    Scores,
    binary_auroc,
    macro_auroc,
    name_list,
    specificity,
    undefined_notes,
)


def multiclass_scores(probs: np.ndarray, targets: np.ndarray, classes: list[str]) -> Scores:
    """Top-1/top-5 accuracy, macro F1 and AUROC, balanced accuracy, log loss, per-class table.

    Args:
        probs: [N, K] softmax probabilities, float64, rows summing to 1.
        targets: [N] true class ids in [0, K).
        classes: K class names, in the order of the columns of `probs`.
    """
    n_classes = len(classes)
    labels = np.arange(n_classes)
    preds = probs.argmax(axis=1)  # [N] first maximum on ties, as torch.argmax
    counts = confusion_matrix(targets, preds, labels=labels)  # [K, K] rows true, cols predicted
    tp = np.diag(counts)
    fp = counts.sum(axis=0) - tp
    fn = counts.sum(axis=1) - tp
    tn = counts.sum() - tp - fp - fn
    precision, recall, f1, support = precision_recall_fscore_support(
        targets, preds, labels=labels, zero_division=np.nan
    )
    auroc = np.array([binary_auroc(targets == k, probs[:, k]) for k in labels])  # [K]
    table = PerClass(
        names=list(classes),
        precision=precision,
        recall=recall,
        specificity=specificity(tn, fp),
        f1=f1,
        auroc=auroc,
        support=support,
    )
    notes = undefined_notes(table, "class")
    overall = {"acc1": float(accuracy_score(targets, preds))}
    if n_classes > 5:
        overall["acc5"] = float(top_k_accuracy_score(targets, probs, k=5, labels=labels))
    # sklearn leaves NaN (undefined) classes out of the macro average; NaN only if all are.
    overall["f1_macro"] = float(
        f1_score(targets, preds, labels=labels, average="macro", zero_division=np.nan)
    )
    overall["auroc_macro"], auroc_notes = macro_auroc(table, "class")
    notes += auroc_notes
    present = support > 0
    # balanced_accuracy_score averages recall over the classes present in the targets.
    overall["balanced_accuracy"] = float(balanced_accuracy_score(targets, preds))
    if not present.all():
        notes.append(
            f"balanced accuracy averages recall over the {int(present.sum())} classes present in "
            f"the targets, leaving out {name_list(table.names, ~present)}"
        )
    overall["log_loss"] = float(log_loss(targets, probs, labels=labels))
    return Scores(overall=overall, per_class=table, confusion=counts, notes=notes)


def row_normalised(counts: np.ndarray) -> np.ndarray:
    """Each row of a [K, K] confusion matrix divided by its sum; NaN rows for absent classes.

    sklearn's `normalize="true"` writes 0 for an empty row, which reads as "never right";
    the row is undefined, so it is NaN here.
    """
    totals = counts.sum(axis=1, keepdims=True).astype(np.float64)  # [K, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, counts / totals, np.nan)
