"""ECE against the formula of Guo et al. (2017) and torchmetrics; temperature against a grid."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassCalibrationError

from vittune.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    logits_from_probs,
    reliability_bins,
)


def softmax(logits: np.ndarray) -> np.ndarray:
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def overconfident(n: int = 2000, k: int = 5, sharpen: float = 3.0, seed: int = 0):
    """Targets drawn from softmax(z), logits reported as sharpen * z: over-confident by T = 3."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k))
    p = softmax(z)
    targets = np.array([rng.choice(k, p=row) for row in p])
    return sharpen * z, targets


def ece_by_hand(probs: np.ndarray, targets: np.ndarray, n_bins: int) -> float:
    """sum_m |B_m| / n * |acc(B_m) - conf(B_m)|, bins (m/M, (m+1)/M]."""
    conf, pred = probs.max(axis=1), probs.argmax(axis=1)
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            gap = abs((pred[in_bin] == targets[in_bin]).mean() - conf[in_bin].mean())
            total += in_bin.sum() / len(conf) * gap
    return total


@pytest.mark.parametrize("n_bins", [5, 15])
def test_ece_equals_the_formula_and_torchmetrics(n_bins: int) -> None:
    logits, targets = overconfident(500, seed=1)
    probs = softmax(logits)
    ece = expected_calibration_error(probs, targets, n_bins)
    assert ece == pytest.approx(ece_by_hand(probs, targets, n_bins), abs=1e-12)
    # torchmetrics bins [lo, hi) instead of (lo, hi]; random confidences never sit on an edge.
    metric = MulticlassCalibrationError(num_classes=5, n_bins=n_bins, norm="l1")
    expected = metric(torch.from_numpy(probs), torch.from_numpy(targets)).item()
    assert ece == pytest.approx(expected, abs=1e-6)


def test_bins_are_right_closed_and_empty_bins_are_nan() -> None:
    # confidences 0.6 (on the edge between bins 2 and 3 of 5) and 0.9; the first is right.
    probs = np.array([[0.6, 0.4], [0.9, 0.1]])
    bins = reliability_bins(probs, np.array([0, 1]), n_bins=5)
    np.testing.assert_array_equal(bins.count, [0, 0, 1, 0, 1])
    np.testing.assert_allclose(bins.confidence[[2, 4]], [0.6, 0.9])
    np.testing.assert_allclose(bins.accuracy[[2, 4]], [1.0, 0.0])
    assert np.isnan(bins.accuracy[[0, 1, 3]]).all()
    assert bins.ece == pytest.approx(0.5 * 0.4 + 0.5 * 0.9)


def test_temperature_undoes_overconfidence_and_matches_a_grid_search() -> None:
    logits, targets = overconfident()
    fit = fit_temperature(logits, targets)
    assert fit.nll_after < fit.nll_before and fit.ece_after < fit.ece_before
    assert fit.temperature == pytest.approx(3.0, rel=0.15)  # the sharpening we applied

    # Brute force with torch's cross-entropy, independent of the scipy search.
    grid = np.geomspace(0.5, 10.0, 3001)
    z, t = torch.from_numpy(logits), torch.from_numpy(targets)
    losses = np.array([torch.nn.functional.cross_entropy(z / g, t).item() for g in grid])
    best = grid[losses.argmin()]
    assert fit.temperature == pytest.approx(best, rel=2e-3)
    assert fit.nll_after == pytest.approx(losses.min(), abs=1e-6)
    assert fit.nll_before == pytest.approx(torch.nn.functional.cross_entropy(z, t).item())


def test_log_probabilities_serve_as_logits() -> None:
    logits, _ = overconfident(50)
    probs = softmax(logits)
    np.testing.assert_allclose(softmax(logits_from_probs(probs)), probs, rtol=1e-9)
