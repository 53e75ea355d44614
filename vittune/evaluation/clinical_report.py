"""The clinical section of an evaluation: AUROC CIs, DeLong, operating point, per group.

Assembled from the pure functions of clinical.py into plain data for metrics.json, plus the
console lines `vittune evaluate` prints. Single-label data is scored one-vs-rest per class
(every class gets its operating point: with two classes, read the row of the finding, as
the class order is alphabetical); multi-label data per finding.
"""

from __future__ import annotations

import math

import numpy as np

from vittune.evaluation.clinical import (
    DEFAULT_RESAMPLES,
    RATES,
    aggregate_groups,
    bootstrap_auroc,
    choose_threshold,
    delong_interval,
    rates_with_intervals,
)
from vittune.evaluation.scores import one_hot


def strata_of(onehot: np.ndarray) -> np.ndarray:
    """[N] the stratum of each image for the bootstrap: its class for single-label data. For
    multi-label data one stratum (a plain bootstrap): label combinations are often unique,
    and a stratum of one image would be resampled as itself, narrowing the interval."""
    if not (onehot.sum(1) == 1).all():
        return np.zeros(len(onehot), np.int64)
    return onehot.argmax(1)


def _num(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def auroc_section(
    probs: np.ndarray, onehot: np.ndarray, classes: list[str], resamples: int, seed: int
) -> dict:
    """AUROC per class and macro with stratified-bootstrap 95% CIs (+ DeLong for binary)."""
    strata = strata_of(onehot)
    fit = bootstrap_auroc(onehot, probs, strata, resamples, seed)
    section = {
        "auroc_macro": _num(fit.macro),
        "auroc_macro_ci95": [_num(v) for v in fit.macro_ci95],
        "bootstrap": {
            "resamples": resamples,
            "seed": seed,
            "stratified_by": "class" if (onehot.sum(1) == 1).all() else "none (multi-label)",
        },
        "per_class": [
            {
                "name": name,
                "auroc": _num(fit.auroc[k]),
                "auroc_ci95_low": _num(fit.low[k]),
                "auroc_ci95_high": _num(fit.high[k]),
            }
            for k, name in enumerate(classes)
        ],
    }
    if len(classes) == 2 and onehot.sum(1).max() == 1:  # binary single-label: DeLong too
        auc, low, high = delong_interval(onehot[:, 1], probs[:, 1])
        section["delong"] = {
            "class": classes[1],
            "auroc": _num(auc),
            "ci95": [_num(low), _num(high)],
        }
    return section


def operating_section(
    probs: np.ndarray,
    onehot: np.ndarray,
    classes: list[str],
    spec: str,
    chosen_on: str,
    val: tuple[np.ndarray, np.ndarray],
    resamples: int,
    seed: int,
) -> dict:
    """Thresholds chosen on `val` (probs [M, K], onehot [M, K]) and the rates they give here."""
    rows = []
    for k in range(len(classes)):  # one-vs-rest: read the row of the finding you care about
        val_probs, val_truth = val[0][:, k], val[1][:, k]
        if val_truth.min() == val_truth.max():
            rows.append({"name": classes[k], "threshold": None, "note": "one class only in val"})
            continue
        threshold = choose_threshold(val_truth, val_probs, spec)
        rates = rates_with_intervals(onehot[:, k], probs[:, k], threshold, resamples, seed)
        rows.append(
            {
                "name": classes[k],
                "threshold": threshold,
                **{r: [_num(v) for v in rates[r]] for r in RATES},
            }
        )
    return {"spec": spec, "chosen_on": chosen_on, "per_class": rows}


def group_section(
    probs: np.ndarray,
    onehot: np.ndarray,
    groups: list[str],
    classes: list[str],
    how: str,
    resamples: int,
    seed: int,
) -> dict:
    """AUROC with CIs over groups (patients/studies): one score per group, `how` = mean|max."""
    names, scored, truth = aggregate_groups(groups, probs, onehot, how)
    return {
        "aggregate": how,
        "groups": len(names),
        **auroc_section(scored, truth, classes, resamples, seed),
    }


def clinical_report(
    probs: np.ndarray,
    targets: np.ndarray,
    classes: list[str],
    *,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    operating_point: str | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
    chosen_on: str = "val",
    groups: list[str] | None = None,
    aggregate: str | None = None,
) -> dict:
    """Everything clinical about one evaluation, as plain data (JSON-ready).

    Args:
        probs: [N, K] probabilities; targets: [N] class ids or [N, K] 0/1.
        operating_point: 'spec=0.95' | 'sens=0.9' | 'youden', chosen on `val` = (probs, targets).
        groups: [N] group of each image; with `aggregate` (mean|max) also scored per group.
    """
    onehot = one_hot(np.asarray(targets), len(classes))
    report = auroc_section(probs, onehot, classes, resamples, seed)
    if operating_point is not None and val is not None:
        val_onehot = one_hot(np.asarray(val[1]), len(classes))
        report["operating_point"] = operating_section(
            probs,
            onehot,
            classes,
            operating_point,
            chosen_on,
            (val[0], val_onehot),
            resamples,
            seed,
        )
    if aggregate is not None and groups is not None:
        report["group_level"] = group_section(
            probs, onehot, groups, classes, aggregate, resamples, seed
        )
    return report


def _ci(values: list) -> str:
    if values[0] is None:
        return "NaN"
    low, high = values[1], values[2]
    bounds = "" if low is None else f" [{low:.3f}, {high:.3f}]"
    return f"{values[0]:.3f}{bounds}"


def format_clinical(report: dict) -> str:
    """The console lines: macro AUROC with its CI, per-class CIs, the operating-point table."""
    if "skipped" in report:
        return report["skipped"]
    low, high = report["auroc_macro_ci95"]
    macro = report["auroc_macro"]
    kind = "stratified" if report["bootstrap"]["stratified_by"] == "class" else "plain"
    lines = [
        f"AUROC macro {macro:.4f}, 95% CI [{low:.4f}, {high:.4f}] "
        f"({kind} bootstrap, {report['bootstrap']['resamples']} resamples)"
        if macro is not None and low is not None
        else "AUROC macro: undefined (a class without positives or negatives)"
    ]
    for row in report["per_class"]:
        lines.append(
            f"  {row['name']}: {_ci([row['auroc'], row['auroc_ci95_low'], row['auroc_ci95_high']])}"
        )
    if "delong" in report:
        d = report["delong"]
        lines.append(f"  DeLong 95% CI ({d['class']}): {_ci([d['auroc'], *d['ci95']])}")
    if "operating_point" in report:
        op = report["operating_point"]
        lines += ["", f"operating point {op['spec']} (threshold chosen on {op['chosen_on']})"]
        lines.append(f"  {'class':<16}{'threshold':>10}" + "".join(f"{r:>22}" for r in RATES))
        for row in op["per_class"]:
            if row["threshold"] is None:
                lines.append(f"  {row['name']:<16}  ({row['note']})")
                continue
            cells = "".join(f"{_ci(row[r]):>22}" for r in RATES)
            # above every probability: only "nothing is positive" met the target on val
            cut = "> 1" if row["threshold"] > 1 else f"{row['threshold']:.4f}"
            lines.append(f"  {row['name']:<16}{cut:>10}{cells}")
    if "group_level" in report:
        g = report["group_level"]
        low, high = g["auroc_macro_ci95"]
        shown = (
            "NaN"
            if g["auroc_macro"] is None or low is None
            else f"{g['auroc_macro']:.4f}, 95% CI [{low:.4f}, {high:.4f}]"
        )
        lines += ["", f"per group ({g['aggregate']} of {g['groups']} groups): AUROC macro {shown}"]
    return "\n".join(lines)
