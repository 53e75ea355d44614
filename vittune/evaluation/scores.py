"""Per-class score table and the helpers that single- and multi-label scoring share.

scikit-learn computes precision, recall, F1 and AUROC; it has no specificity and raises or
warns (then returns 0 or NaN depending on the function) where a score is undefined. Here every
undefined score is NaN and comes with a note that says which classes and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.metrics import roc_auc_score


def one_hot(targets: np.ndarray, classes: int) -> np.ndarray:
    """[N] class ids -> [N, K] 0/1; [N, K] multi-label targets pass through."""
    if targets.ndim == 2:
        return targets.astype(np.int64)
    return np.eye(classes, dtype=np.int64)[targets]


@dataclass(frozen=True)
class PerClass:
    """One row per class (or label); NaN marks a score that is undefined for that class."""

    names: list[str]
    precision: np.ndarray  # [K] tp / (tp + fp)
    recall: np.ndarray  # [K] tp / (tp + fn), the sensitivity
    specificity: np.ndarray  # [K] tn / (tn + fp)
    f1: np.ndarray  # [K] 2 tp / (2 tp + fp + fn)
    auroc: np.ndarray  # [K] one-vs-rest (single-label) or per label (multi-label)
    support: np.ndarray  # [K] int, positives in the targets

    def rows(self) -> list[dict[str, object]]:
        """The table as a list of dicts, one per class, in class order."""
        return [
            {
                "name": name,
                "precision": float(self.precision[k]),
                "recall": float(self.recall[k]),
                "specificity": float(self.specificity[k]),
                "f1": float(self.f1[k]),
                "auroc": float(self.auroc[k]),
                "support": int(self.support[k]),
            }
            for k, name in enumerate(self.names)
        ]


@dataclass(frozen=True)
class Scores:
    """Overall metrics, the per-class table, confusion counts and notes on undefined values."""

    overall: dict[str, float]
    per_class: PerClass
    confusion: np.ndarray  # [K, K] (true, predicted) single-label; [K, 2, 2] per label multi-label
    notes: list[str] = field(default_factory=list)


def specificity(tn: np.ndarray, fp: np.ndarray) -> np.ndarray:
    """tn / (tn + fp), NaN where a class has no negatives (sklearn has no specificity)."""
    tn, fp = tn.astype(np.float64), fp.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tn + fp > 0, tn / (tn + fp), np.nan)


def binary_auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the 0/1 `positive` labels; NaN when only one of them occurs."""
    if positive.min() == positive.max():
        return float("nan")  # sklearn would warn per class; undefined_notes says it once
    return float(roc_auc_score(positive, score))


def name_list(names: list[str], mask: np.ndarray, limit: int = 10) -> str:
    """'a, b, c' for the names where mask is true, shortened to `limit` names."""
    chosen = [n for n, m in zip(names, mask, strict=True) if m]
    more = f" and {len(chosen) - limit} more" if len(chosen) > limit else ""
    return ", ".join(chosen[:limit]) + more


def undefined_notes(table: PerClass, kind: str) -> list[str]:
    """One note per score that is NaN for some class, naming those classes.

    Args:
        table: the per-class scores.
        kind: "class" or "label", for the wording.
    """
    reasons = {
        "precision": "never predicted (tp + fp = 0)",
        "recall": "absent from the targets (tp + fn = 0)",
        "specificity": "present in every sample (tn + fp = 0)",
        "f1": "absent from targets and predictions (2 tp + fp + fn = 0); left out of the macro F1",
        "auroc": "only one of positive/negative in the targets",
    }
    notes = []
    for score, reason in reasons.items():
        undefined = np.isnan(getattr(table, score))
        if undefined.any():
            noun = kind if undefined.sum() == 1 else plural(kind)
            names = name_list(table.names, undefined)
            notes.append(f"{score} is undefined (NaN) for {noun} {names}: {reason}")
    return notes


def plural(kind: str) -> str:
    """'classes' for 'class', 'labels' for 'label'."""
    return kind + ("es" if kind.endswith("s") else "s")


def macro_auroc(table: PerClass, kind: str) -> tuple[float, list[str]]:
    """Mean of the per-class AUROCs (sklearn's 'ovr' macro); NaN if any class's is undefined.

    Averaging only the defined ones would report a number over a different set of classes
    than the user asked about, so the macro is NaN and the per-class column shows the rest.
    """
    if np.isnan(table.auroc).any():
        return float("nan"), [f"macro AUROC is undefined (NaN): some {plural(kind)} have no AUROC"]
    return float(table.auroc.mean()), []
