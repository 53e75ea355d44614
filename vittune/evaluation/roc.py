"""ROC curve points (scikit-learn's `roc_curve`): binary, one-vs-rest per class, or per label."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import auc, roc_curve

from vittune.evaluation.scores import one_hot


@dataclass(frozen=True)
class RocCurve:
    """Points of one ROC curve and the area under it."""

    fpr: np.ndarray  # [P] false-positive rate, increasing
    tpr: np.ndarray  # [P] true-positive rate
    thresholds: np.ndarray  # [P] decision threshold of each point (the first is +inf)
    auc: float


def roc(positive: np.ndarray, score: np.ndarray) -> RocCurve | None:
    """The ROC curve of `score` for 0/1 `positive`; None when only one of the two occurs."""
    if positive.min() == positive.max():
        return None  # sklearn would warn and return a NaN axis: there is no curve to draw
    fpr, tpr, thresholds = roc_curve(positive, score)
    return RocCurve(fpr=fpr, tpr=tpr, thresholds=thresholds, auc=float(auc(fpr, tpr)))


def roc_curves(
    probs: np.ndarray, targets: np.ndarray, classes: list[str]
) -> tuple[dict[str, RocCurve], list[str]]:
    """ROC of the positive class (binary), of each class against the rest (more than two
    classes), or of each label (multi-label), with notes.

    Args:
        probs: [N, K] probabilities.
        targets: [N] class ids with K == 2, or [N, K] 0/1 labels.
        classes: K names; a binary curve is named after the second class (the positive one).

    Returns:
        Curves by name (their AUCs are the per-class AUROCs of the report), and notes on
        classes or labels left out.
    """
    if targets.ndim == 1:
        targets = one_hot(targets, len(classes))  # [N, K]
        columns = [1] if len(classes) == 2 else list(range(len(classes)))
    else:
        columns = list(range(len(classes)))
    curves, missing = {}, []
    for k in columns:
        curve = roc(targets[:, k], probs[:, k])
        if curve is None:
            missing.append(classes[k])
        else:
            curves[classes[k]] = curve
    notes = (
        [f"no ROC curve for {', '.join(missing)}: only positives or only negatives in the targets"]
        if missing
        else []
    )
    return curves, notes
