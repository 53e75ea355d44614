"""Calibration of single-label classifiers: reliability bins, ECE and temperature scaling.

Neither scikit-learn nor torchmetrics returns the per-bin table a reliability diagram needs
(sklearn's `calibration_curve` is binary and drops empty bins; torchmetrics returns only the
scalar), and neither fits a temperature, so these few formulas are written out here.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

# Guo et al. (2017), "On Calibration of Modern Neural Networks", use 15 equal-width bins.
DEFAULT_BINS = 15

# Probabilities are clipped here before taking logs, so a hard 0 gives a finite logit.
_EPS = 1e-12

# Search range for T; a best T outside it means the scores carry no usable confidence (or,
# towards the low end, that every prediction is right and sharpening only ever helps).
TEMPERATURE_RANGE = (1e-2, 1e2)


@dataclass(frozen=True)
class ReliabilityBins:
    """Equal-width bins over top-1 confidence; bin m holds confidences in (lo_m, hi_m].

    `confidence` and `accuracy` are NaN for empty bins (undefined, not zero).
    """

    edges: np.ndarray  # [M + 1]
    count: np.ndarray  # [M] int
    confidence: np.ndarray  # [M] mean top-1 probability in the bin
    accuracy: np.ndarray  # [M] fraction of correct top-1 predictions in the bin

    @property
    def ece(self) -> float:
        """Expected calibration error: sum over bins of |B_m|/n * |acc(B_m) - conf(B_m)|."""
        filled = self.count > 0
        weights = self.count[filled] / self.count.sum()
        return float(np.sum(weights * np.abs(self.accuracy[filled] - self.confidence[filled])))


@dataclass(frozen=True)
class TemperatureFit:
    """A temperature T fitted by minimising NLL of softmax(logits / T), with before/after."""

    temperature: float
    at_bound: bool  # no interior minimum: an end of TEMPERATURE_RANGE fits as well as T
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float


def reliability_bins(
    probs: np.ndarray, targets: np.ndarray, n_bins: int = DEFAULT_BINS
) -> ReliabilityBins:
    """Bin samples by top-1 confidence and measure accuracy in each bin (Guo et al. 2017).

    Args:
        probs: [N, K] class probabilities (rows sum to 1).
        targets: [N] true class ids.
        n_bins: number of equal-width bins over [0, 1].
    """
    confidence = probs.max(axis=1)  # [N]
    correct = probs.argmax(axis=1) == targets  # [N]
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" on the inner edges puts a confidence equal to an edge in the lower bin,
    # i.e. bins are right-closed (lo, hi] as in the paper.
    index = np.searchsorted(edges[1:-1], confidence, side="left")  # [N] in [0, M)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=correct.astype(float), minlength=n_bins) / count
    return ReliabilityBins(edges=edges, count=count, confidence=mean_conf, accuracy=accuracy)


def expected_calibration_error(
    probs: np.ndarray, targets: np.ndarray, n_bins: int = DEFAULT_BINS
) -> float:
    """ECE with equal-width bins over top-1 confidence (Guo et al. 2017)."""
    return reliability_bins(probs, targets, n_bins).ece


def logits_from_probs(probs: np.ndarray) -> np.ndarray:
    """log(probs): softmax of these gives back probs, so they serve as logits for scaling."""
    return np.log(np.clip(probs, _EPS, 1.0))


def nll(logits: np.ndarray, targets: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of softmax(logits / temperature) at the true class."""
    log_probs = log_softmax(logits / temperature, axis=1)  # [N, K]
    return float(-log_probs[np.arange(len(targets)), targets].mean())


def calibrated_bins(
    probs: np.ndarray, targets: np.ndarray, temperature: float, n_bins: int = DEFAULT_BINS
) -> ReliabilityBins:
    """The reliability bins of softmax(logits / T): the curve a fitted temperature gives."""
    logits = logits_from_probs(probs).astype(np.float64) / temperature  # [N, K]
    return reliability_bins(np.exp(log_softmax(logits, axis=1)), targets, n_bins)


def fit_temperature(
    logits: np.ndarray, targets: np.ndarray, n_bins: int = DEFAULT_BINS
) -> TemperatureFit:
    """Fit T > 0 minimising NLL of softmax(logits / T) on the given data (Guo et al. 2017).

    The NLL is convex in 1/T, so it has one minimum along log T and a bounded scalar search
    finds it; searching log T keeps T positive without a constraint. Fitting on the data
    that is then scored flatters the "after" numbers: fit on validation, apply to test.
    """
    logits = logits.astype(np.float64)
    result = minimize_scalar(
        lambda log_t: nll(logits, targets, float(np.exp(log_t))),
        bounds=tuple(np.log(TEMPERATURE_RANGE)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(np.exp(result.x))
    nll_after = nll(logits, targets, temperature)
    before = np.exp(log_softmax(logits, axis=1))  # [N, K]
    after = np.exp(log_softmax(logits / temperature, axis=1))  # [N, K]
    return TemperatureFit(
        temperature=temperature,
        # Separable data drive the NLL to 0 as T -> 0 (it underflows to exactly 0 on the way),
        # so the "minimum" is wherever the search stopped; compare with the range's ends.
        at_bound=min(nll(logits, targets, t) for t in TEMPERATURE_RANGE) <= nll_after + 1e-12,
        nll_before=nll(logits, targets),
        nll_after=nll_after,
        ece_before=expected_calibration_error(before, targets, n_bins),
        ece_after=expected_calibration_error(after, targets, n_bins),
    )
