"""Clinical numbers: AUROC with 95% confidence intervals, and operating points.

Medical results are read as AUROC with its 95% CI and as sensitivity / specificity / PPV /
NPV at a threshold chosen on validation and applied unchanged to test. scikit-learn has
the point estimates (`roc_auc_score`, `roc_curve`) but neither CIs nor DeLong's variance,
so two things are written here, each tested against an independent computation:

- a stratified bootstrap (positives and negatives resampled separately, so every resample
  has both; seeded). AUROC per resample is Mann-Whitney's pair count, vectorised over
  resamples (`resampled_auroc`): a thousand `roc_auc_score` calls per class would cost
  seconds of Python overhead, for the same number (the test checks it equals scikit-learn's);
- DeLong's variance of a binary AUROC (DeLong et al. 1988, with Sun & Xu's midrank form),
  the usual analytic interval, which the tests cross-check against the bootstrap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata

DEFAULT_RESAMPLES = 1000
_CHUNK_VALUES = 2_000_000  # item counts held at once ([chunk, N] integers, 16 MB)


def auroc_ranks(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUROC of each row: labels [..., N] in {0, 1}, scores [..., N] -> [...] (ties count 1/2)."""
    ranks = rankdata(scores, axis=-1)  # [..., N] midranks
    positives = labels.sum(axis=-1)  # [...]
    negatives = labels.shape[-1] - positives
    rank_sum = (ranks * labels).sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def resampled_auroc(labels: np.ndarray, scores: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """AUROC on each resample: labels [N] in {0, 1}, scores [N], draws [R, N] indices into
    the N items -> [R]; NaN where a resample has no positive or no negative.

    A resample only repeats items, so the items are sorted once and a resample becomes a count
    per item; the pairs (positive above negative, ties 1/2) are then summed over the groups of
    tied scores in sorted order: O(N) a resample instead of ranking it (O(N log N)), which
    matters for a 100,000-image test set with a thousand resamples per class.
    """
    count = len(scores)
    order = np.argsort(scores, kind="stable")  # [N]
    ranked = scores[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # [G] first of each tie
    place = np.empty(count, np.int64)
    place[order] = np.arange(count)  # sorted position of each item
    rows = np.arange(len(draws))[:, None] * count  # [R, 1]
    flat = (rows + place[draws]).ravel()
    times = np.bincount(flat, minlength=len(draws) * count).reshape(len(draws), count)  # [R, N]
    positive = labels[order].astype(bool)  # [N], sorted
    pos = np.add.reduceat(times * positive, starts, axis=1)  # [R, G] positives per tie group
    neg = np.add.reduceat(times * ~positive, starts, axis=1)  # [R, G]
    below = np.cumsum(neg, axis=1) - neg  # [R, G] negatives scored lower than the group
    pairs = (pos * (below + 0.5 * neg)).sum(axis=1)  # [R]
    with np.errstate(invalid="ignore", divide="ignore"):
        return pairs / (pos.sum(axis=1) * neg.sum(axis=1))


def stratified_resamples(strata: np.ndarray, count: int, seed: int) -> np.ndarray:
    """[count, N] indices: each resample draws, with replacement, as many items of each
    stratum as the data has (so class balance and the presence of both classes hold)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, len(strata)), np.int64)
    start = 0
    for value in np.unique(strata):
        members = np.flatnonzero(strata == value)  # [n_s]
        out[:, start : start + len(members)] = rng.choice(members, (count, len(members)))
        start += len(members)
    return out


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return float("nan"), float("nan")
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


@dataclass(frozen=True)
class AurocIntervals:
    """Per-class AUROC [K] with 95% bootstrap CIs, and the macro mean with its CI."""

    auroc: np.ndarray  # [K]; NaN where a class has no positive or no negative
    low: np.ndarray  # [K]
    high: np.ndarray  # [K]
    macro: float
    macro_ci95: tuple[float, float]
    resamples: int
    seed: int


def bootstrap_auroc(
    onehot: np.ndarray,
    probs: np.ndarray,
    strata: np.ndarray,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> AurocIntervals:
    """One-vs-rest AUROC per column with percentile 95% CIs from a stratified bootstrap.

    Args:
        onehot: [N, K] 0/1 truth (one-hot for single-label, multi-hot for multi-label).
        probs: [N, K] scores.
        strata: [N] what each resample keeps the counts of (the true class; all zeros for
            a plain bootstrap). A resample where a column lacks positives or negatives gives
            NaN for it, left out of its interval.
        resamples: bootstrap resamples; seed: their generator's seed.
    """
    auroc = auroc_ranks(onehot.T, probs.T)  # [K]
    draws = stratified_resamples(strata, resamples, seed)  # [R, N]
    per_class = np.empty((resamples, onehot.shape[1]))  # [R, K]
    chunk = max(1, _CHUNK_VALUES // len(probs))  # resamples counted at once
    for start in range(0, resamples, chunk):
        rows = draws[start : start + chunk]  # [r, N]
        for k in range(onehot.shape[1]):
            per_class[start : start + len(rows), k] = resampled_auroc(
                onehot[:, k], probs[:, k], rows
            )
    defined = np.isfinite(auroc)  # the macro mean is over classes defined on the full data
    macro_draws = (
        per_class[:, defined].mean(axis=1) if defined.any() else np.full(resamples, np.nan)
    )
    bounds = np.array([_interval(per_class[:, k]) for k in range(onehot.shape[1])])  # [K, 2]
    bounds[~defined] = np.nan
    return AurocIntervals(
        auroc=auroc,
        low=bounds[:, 0],
        high=bounds[:, 1],
        macro=float(auroc[defined].mean()) if defined.any() else float("nan"),
        macro_ci95=_interval(macro_draws),
        resamples=resamples,
        seed=seed,
    )


def delong_interval(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float, float]:
    """(AUROC, low, high): DeLong's asymptotic 95% CI of a binary AUROC, clipped to [0, 1]."""
    labels = np.asarray(labels).astype(bool)
    positive, negative = scores[labels], scores[~labels]  # [m], [n]
    m, n = len(positive), len(negative)
    if m < 2 or n < 2:
        return float("nan"), float("nan"), float("nan")
    # Midranks give each structural component without the m x n comparison matrix:
    # V10_i = (rank of x_i among all - rank among positives) / n, likewise V01_j.
    every = rankdata(np.concatenate([positive, negative]))  # [m + n]
    v10 = (every[:m] - rankdata(positive)) / n  # [m] P(x_i > negative)
    v01 = 1.0 - (every[m:] - rankdata(negative)) / m  # [n] P(positive > y_j)
    auc = float(v10.mean())
    variance = v10.var(ddof=1) / m + v01.var(ddof=1) / n
    half = float(norm.ppf(0.975) * np.sqrt(variance))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def parse_operating_point(spec: str) -> tuple[str, float | None]:
    """'spec=0.95' | 'sens=0.9' | 'youden' -> (kind, target); ValueError names the forms."""
    text = spec.strip().lower()
    if text == "youden":
        return "youden", None
    kind, _, value = text.partition("=")
    try:
        target = float(value)
    except ValueError:
        target = float("nan")
    if kind not in ("spec", "sens") or not 0.0 < target <= 1.0:
        raise ValueError(
            f"--operating-point {spec!r}: use spec=<0..1>, sens=<0..1> or youden, e.g. spec=0.95"
        )
    return kind, target


def choose_threshold(labels: np.ndarray, scores: np.ndarray, spec: str) -> float:
    """The score threshold (score >= threshold is positive) that meets `spec` on these data
    (validation): the most sensitive one with specificity >= target, the most specific one
    with sensitivity >= target, or the one maximising Youden's J = sens + spec - 1."""
    from sklearn.metrics import roc_curve  # noqa: PLC0415

    kind, target = parse_operating_point(spec)
    fpr, tpr, thresholds = roc_curve(labels, scores)  # thresholds descending, [0] = inf
    if kind == "youden":
        best = int(np.argmax(tpr - fpr))
    elif kind == "spec":
        ok = np.flatnonzero(1.0 - fpr >= target - 1e-12)  # a prefix: fpr only grows
        best = int(ok[np.argmax(tpr[ok])])
    else:
        ok = np.flatnonzero(tpr >= target - 1e-12)
        best = int(ok[np.argmin(fpr[ok])])
    return float(min(thresholds[best], np.nextafter(np.float64(1.0), 2.0)))


def _rates(labels: np.ndarray, decided: np.ndarray) -> np.ndarray:
    """[..., 4] sensitivity, specificity, PPV, NPV from 0/1 labels and decisions [..., N]."""
    tp = (decided & labels).sum(-1)
    fn = (~decided & labels).sum(-1)
    tn = (~decided & ~labels).sum(-1)
    fp = (decided & ~labels).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.stack([tp / (tp + fn), tn / (tn + fp), tp / (tp + fp), tn / (tn + fn)], -1)


RATES = ("sensitivity", "specificity", "ppv", "npv")


def rates_with_intervals(
    labels: np.ndarray,
    scores: np.ndarray,
    threshold: float,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """{rate: (value, low, high)} at a fixed threshold; CIs from the stratified bootstrap
    (the threshold stays fixed: it was chosen on other data)."""
    labels = np.asarray(labels).astype(bool)
    decided = scores >= threshold  # [N]
    point = _rates(labels, decided)  # [4]
    draws = stratified_resamples(labels.astype(int), resamples, seed)  # [R, N]
    sampled = _rates(labels[draws], decided[draws])  # [R, 4]
    return {name: (float(point[i]), *_interval(sampled[:, i])) for i, name in enumerate(RATES)}


def aggregate_groups(
    groups: list[str], probs: np.ndarray, onehot: np.ndarray, how: str
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Scores per group (patient/study): (group names, probs [G, K], truth [G, K]).

    A group's score is the mean or max of its images' scores; its truth is positive for a
    class when any of its images is (a patient with the finding on one view has it)."""
    names = sorted(set(groups))
    where = {g: i for i, g in enumerate(names)}
    index = np.array([where[g] for g in groups])  # [N] group of each image
    k = probs.shape[1]
    scored, truth = np.zeros((len(names), k)), np.zeros((len(names), k), np.int64)
    for g in range(len(names)):
        rows = index == g
        scored[g] = probs[rows].mean(0) if how == "mean" else probs[rows].max(0)
        truth[g] = onehot[rows].max(0)
    return names, scored, truth
