"""The mistakes a classifier made most confidently: the first images to look at."""

from __future__ import annotations

import numpy as np


def confident_mistakes(
    probs: np.ndarray, targets: np.ndarray, threshold: np.ndarray | None = None, limit: int = 16
) -> np.ndarray:
    """Indices of wrong predictions, the most confident first.

    Single-label: samples whose top-1 class is wrong, ranked by the probability given to
    that wrong class. Multi-label: samples with at least one wrong label, ranked by the
    largest confidence in a wrong decision (p for a false positive, 1 - p for a false negative).
    Ties keep sample order, so the result is deterministic.

    Args:
        probs: [N, K] probabilities.
        targets: [N] class ids, or [N, K] 0/1 labels.
        threshold: [K] decision thresholds (multi-label only; p > threshold is positive).
        limit: at most this many indices.

    Returns:
        [M] int sample indices, M <= limit.
    """
    if targets.ndim == 1:
        preds = probs.argmax(axis=1)  # [N]
        wrong = preds != targets  # [N]
        confidence = probs[np.arange(len(probs)), preds]  # [N] probability of the predicted class
    else:
        decided = probs > threshold  # [N, K]
        wrong_labels = decided != targets.astype(bool)  # [N, K]
        in_decision = np.where(decided, probs, 1.0 - probs)  # [N, K] confidence in each decision
        wrong = wrong_labels.any(axis=1)  # [N]
        confidence = np.where(wrong_labels, in_decision, -np.inf).max(axis=1)  # [N]
    order = np.argsort(-confidence, kind="stable")  # [N] most confident first
    return order[wrong[order]][:limit]
