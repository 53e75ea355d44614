"""Clinical numbers against scikit-learn and independent computations."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import confusion_matrix, roc_auc_score

from vittune.evaluation.clinical import (
    aggregate_groups,
    auroc_ranks,
    bootstrap_auroc,
    choose_threshold,
    delong_interval,
    parse_operating_point,
    rates_with_intervals,
    resampled_auroc,
    stratified_resamples,
)
from vittune.evaluation.clinical_report import auroc_section, clinical_report, format_clinical


def _binary(n: int = 600, separation: float = 1.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.3).astype(int)
    scores = 1 / (1 + np.exp(-rng.normal(labels * separation, 1.0)))
    return labels, np.round(scores, 2)  # rounded: ties, as real softmax outputs have


def test_rank_auroc_equals_sklearn_with_ties() -> None:
    labels, scores = _binary()
    assert auroc_ranks(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_resampled_auroc_equals_sklearn_on_each_resample_with_ties() -> None:
    """Counting pairs per tie group on the once-sorted items gives roc_auc_score's number on
    every resample, repeated items and tied scores included; a resample with one class: NaN."""
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 90)
    scores = np.round(0.3 * labels + rng.random(90), 1)  # coarse: many ties across classes
    draws = rng.integers(0, 90, (50, 90))  # [R, N] with replacement
    draws[0] = np.flatnonzero(labels == 1)[0]  # one item 90 times: positives only
    got = resampled_auroc(labels, scores, draws)
    assert np.isnan(got[0])
    want = [roc_auc_score(labels[d], scores[d]) for d in draws[1:]]
    np.testing.assert_allclose(got[1:], want, rtol=0, atol=1e-12)


def test_bootstrap_intervals_equal_a_plain_sklearn_loop_over_the_same_resamples() -> None:
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 3, 240)
    probs = rng.dirichlet(np.ones(3), 240) * 0.6 + np.eye(3)[targets] * 0.4  # [N, 3]
    onehot = np.eye(3, dtype=int)[targets]
    fit = bootstrap_auroc(onehot, probs, targets, resamples=200, seed=3)
    np.testing.assert_allclose(
        fit.auroc, roc_auc_score(targets, probs, multi_class="ovr", average=None)
    )
    assert fit.macro == pytest.approx(roc_auc_score(targets, probs, multi_class="ovr"))
    draws = stratified_resamples(targets, 200, 3)
    per = np.array([[roc_auc_score(onehot[d, k], probs[d, k]) for k in range(3)] for d in draws])
    np.testing.assert_allclose(fit.low, np.percentile(per, 2.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(fit.high, np.percentile(per, 97.5, axis=0), atol=1e-12)
    np.testing.assert_allclose(fit.macro_ci95, np.percentile(per.mean(1), [2.5, 97.5]), atol=1e-12)
    assert all(
        np.bincount(targets[d], minlength=3).tolist() == np.bincount(targets).tolist()
        for d in draws[:5]
    )


def _delong_direct(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """DeLong 1988 written out with the m x n comparison matrix: (auc, variance)."""
    x, y = scores[labels == 1], scores[labels == 0]
    psi = (x[:, None] > y[None, :]) + 0.5 * (x[:, None] == y[None, :])  # [m, n]
    v10, v01 = psi.mean(1), psi.mean(0)
    return psi.mean(), v10.var(ddof=1) / len(x) + v01.var(ddof=1) / len(y)


def test_delong_matches_its_direct_form_and_agrees_with_the_bootstrap() -> None:
    labels, scores = _binary()
    auc, low, high = delong_interval(labels, scores)
    direct_auc, variance = _delong_direct(labels, scores)
    half = norm.ppf(0.975) * np.sqrt(variance)
    assert auc == pytest.approx(direct_auc) and auc == pytest.approx(roc_auc_score(labels, scores))
    assert (low, high) == pytest.approx((auc - half, auc + half))
    fit = bootstrap_auroc(
        np.eye(2, dtype=int)[labels], np.stack([1 - scores, scores], 1), labels, 2000, 0
    )
    # two estimates of one interval: they agree to within a hundredth here (600 images)
    assert abs(fit.low[1] - low) < 0.01 and abs(fit.high[1] - high) < 0.01


def _brute_rates(labels: np.ndarray, scores: np.ndarray, t: float) -> tuple[float, float]:
    tn, fp, fn, tp = confusion_matrix(labels, scores >= t, labels=[0, 1]).ravel()
    return tp / (tp + fn), tn / (tn + fp)


@pytest.mark.parametrize("spec", ["spec=0.9", "sens=0.8", "youden"])
def test_operating_point_is_the_best_threshold_meeting_the_target(spec: str) -> None:
    labels, scores = _binary(seed=4)
    chosen = choose_threshold(labels, scores, spec)
    candidates = np.unique(np.concatenate([scores, [1.01]]))
    table = {t: _brute_rates(labels, scores, t) for t in candidates}  # t: (sens, spec)
    kind, target = parse_operating_point(spec)
    if kind == "spec":
        best = max(v[0] for v in table.values() if v[1] >= target)
        assert table[chosen][1] >= target and table[chosen][0] == best
    elif kind == "sens":
        best = max(v[1] for v in table.values() if v[0] >= target)
        assert table[chosen][0] >= target and table[chosen][1] == best
    else:
        assert sum(table[chosen]) == pytest.approx(max(a + b for a, b in table.values()))


def test_rates_at_a_threshold_match_sklearn_and_a_wilson_interval() -> None:
    labels, scores = _binary(n=2000, seed=5)
    rates = rates_with_intervals(labels, scores, 0.6, resamples=1000, seed=0)
    tn, fp, fn, tp = confusion_matrix(labels, scores >= 0.6).ravel()
    for name, (hits, total) in {
        "sensitivity": (tp, tp + fn),
        "specificity": (tn, tn + fp),
        "ppv": (tp, tp + fp),
        "npv": (tn, tn + fn),
    }.items():
        value, low, high = rates[name]
        assert value == pytest.approx(hits / total)
        z, p = 1.959964, hits / total  # Wilson score interval, an independent 95% CI
        centre = (p + z * z / (2 * total)) / (1 + z * z / total)
        half = z * np.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
        # PPV/NPV resample with the class counts fixed, not their own denominators: close only
        assert abs(low - (centre - half)) < 0.02 and abs(high - (centre + half)) < 0.02


def test_group_aggregation_and_the_report() -> None:
    groups = ["a", "a", "b", "b", "c", "d"]
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    onehot = np.array([[1, 0], [0, 1], [1, 0], [1, 0], [0, 1], [1, 0]])
    names, scored, truth = aggregate_groups(groups, probs, onehot, "max")
    assert names == ["a", "b", "c", "d"]
    np.testing.assert_allclose(scored[:, 1], [0.6, 0.3, 0.8, 0.4])
    np.testing.assert_array_equal(truth[:, 1], [1, 0, 1, 0])
    _, mean, _ = aggregate_groups(groups, probs, onehot, "mean")
    np.testing.assert_allclose(mean[:, 1], [0.35, 0.25, 0.8, 0.4])
    labels, scores = _binary(n=300, seed=6)
    two = np.stack([1 - scores, scores], 1)
    report = clinical_report(
        two,
        labels,
        ["normal", "finding"],
        resamples=200,
        operating_point="spec=0.9",
        val=(two, labels),
        groups=[str(i // 3) for i in range(300)],
        aggregate="mean",
    )
    assert report["auroc_macro"] == pytest.approx(roc_auc_score(labels, scores))
    assert report["delong"]["auroc"] == pytest.approx(roc_auc_score(labels, scores))
    row = report["operating_point"]["per_class"][1]
    assert row["name"] == "finding" and row["specificity"][0] >= 0.9  # chosen on the same data
    assert report["group_level"]["groups"] == 100
    text = format_clinical(report)
    assert (
        "95% CI" in text and "operating point spec=0.9" in text and "per group (mean of 100" in text
    )


def test_operating_point_spelling_errors() -> None:
    for bad in ("spec", "spec=1.5", "ppv=0.9", "sens=x"):
        with pytest.raises(ValueError, match="spec=<0..1>"):
            parse_operating_point(bad)


def test_multi_label_takes_a_plain_bootstrap_and_skips_resamples_without_positives() -> None:
    rng = np.random.default_rng(8)
    truth = (rng.random((150, 3)) < [0.5, 0.3, 0.03]).astype(int)  # a rare third finding
    probs = np.clip(truth * 0.3 + rng.random((150, 3)) * 0.7, 0, 1)
    report = clinical_report(probs, truth, ["a", "b", "rare"], resamples=300, seed=1)
    assert report["bootstrap"]["stratified_by"] == "none (multi-label)"
    for k, row in enumerate(report["per_class"]):
        assert row["auroc"] == pytest.approx(roc_auc_score(truth[:, k], probs[:, k]))
        assert row["auroc_ci95_low"] <= row["auroc"] <= row["auroc_ci95_high"]
    draws = stratified_resamples(np.zeros(150, int), 300, 1)  # what a plain bootstrap draws
    rare = [roc_auc_score(truth[d, 2], probs[d, 2]) for d in draws if 0 < truth[d, 2].sum() < 150]
    assert report["per_class"][2]["auroc_ci95_low"] == pytest.approx(np.percentile(rare, 2.5))


def test_large_evaluations_skip_cis_unless_asked(tmp_path) -> None:
    from vittune.evaluation.clinical_run import AUTO_BUDGET, ClinicalOptions, clinical_numbers

    rng = np.random.default_rng(9)
    n = int(AUTO_BUDGET / 1000 / 2) + 1  # two classes: just over the automatic budget
    targets = rng.integers(0, 2, n)
    probs = np.stack([1 - (p := rng.random(n)), p], 1)
    skipped = clinical_numbers(
        tmp_path, ["a", "b"], ClinicalOptions(), probs, targets, [None] * n, "test", None
    )
    assert skipped["auroc_macro_ci95"] == [None, None] and "--bootstrap 1000" in format_clinical(
        skipped
    )
    small = clinical_numbers(
        tmp_path,
        ["a", "b"],
        ClinicalOptions(),
        probs[:500],
        targets[:500],
        [None] * 500,
        "test",
        None,
    )
    assert small["bootstrap"]["resamples"] == 1000 and small["auroc_macro_ci95"][0] is not None


def test_the_console_line_names_the_bootstrap_that_was_run() -> None:
    rng = np.random.default_rng(0)
    probs = rng.random((40, 3))
    multi_hot = (rng.random((40, 3)) > 0.5).astype(int)  # multi-label: one stratum
    one_hot = np.eye(3, dtype=int)[rng.integers(0, 3, 40)]
    plain = format_clinical(auroc_section(probs, multi_hot, ["a", "b", "c"], 50, 0))
    stratified = format_clinical(auroc_section(probs, one_hot, ["a", "b", "c"], 50, 0))
    assert "(plain bootstrap, 50 resamples)" in plain.splitlines()[0]
    assert "(stratified bootstrap, 50 resamples)" in stratified.splitlines()[0]
