"""One evaluation report from probabilities and targets: what `vittune evaluate` prints and saves.

The numbers come from scikit-learn (see multiclass.py, multilabel.py); this module checks the
inputs, picks single- or multi-label scoring, adds calibration, ROC points and the most
confident mistakes, and renders the result as JSON and as a console table.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning

from vittune.evaluation.calibration import (
    DEFAULT_BINS,
    TEMPERATURE_RANGE,
    ReliabilityBins,
    TemperatureFit,
    fit_temperature,
    logits_from_probs,
    reliability_bins,
)
from vittune.evaluation.mistakes import confident_mistakes
from vittune.evaluation.multiclass import multiclass_scores, row_normalised
from vittune.evaluation.multilabel import multilabel_scores
from vittune.evaluation.roc import RocCurve, roc_curves
from vittune.evaluation.scores import PerClass

# Softmax rows may miss 1 by float32 rounding; further off, they are not probabilities.
_SUM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class EvaluationReport:
    """Everything `vittune evaluate` reports; NaN marks an undefined value, explained in notes."""

    classes: list[str]
    multi_label: bool
    num_samples: int
    overall: dict[str, float]
    per_class: PerClass
    confusion: np.ndarray  # [K, K] counts (true, predicted); multi-label [K, 2, 2] per label
    confusion_normalised: np.ndarray | None  # [K, K] rows sum to 1; None for multi-label
    reliability: ReliabilityBins | None  # None for multi-label
    temperature: TemperatureFit | None
    roc: dict[str, RocCurve]
    mistakes: np.ndarray  # [M] sample indices, most confident mistake first
    threshold: np.ndarray | None  # [K] multi-label decision thresholds
    notes: list[str]

    def to_dict(self) -> dict:
        """Plain Python types only; NaN and infinities become None (JSON null)."""
        return _plain(self)

    def to_json(self, indent: int | None = 2) -> str:
        """Strict JSON (no NaN tokens, which many readers reject)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)


def _plain(value: object) -> object:
    if is_dataclass(value):
        if isinstance(value, PerClass):
            return _plain(value.rows())  # one record per class reads better than columns
        out = {f.name: _plain(getattr(value, f.name)) for f in fields(value)}
        if isinstance(value, ReliabilityBins):
            out["ece"] = _plain(value.ece)
        return out
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _as_numpy(values: object) -> np.ndarray:
    if hasattr(values, "detach"):  # a torch tensor, possibly on the GPU
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def check_inputs(
    probs: object, targets: object, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and ranges; return float64 probs [N, K] and int64 targets.

    Mismatched inputs here are bugs in the caller (the CLI checks the user's data first), so
    they raise ValueError. Softmax rows are renormalised in float64 to remove float32 rounding.
    """
    probs = _as_numpy(probs).astype(np.float64)
    targets = _as_numpy(targets)
    if probs.ndim != 2 or len(probs) == 0:
        raise ValueError(f"probs must be [N, K] with N > 0, got shape {probs.shape}")
    n, k = probs.shape
    if k != len(classes):
        raise ValueError(f"probs has {k} columns but {len(classes)} class names were given")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs must be finite probabilities in [0, 1]")
    if targets.shape not in {(n,), (n, k)}:
        raise ValueError(f"targets must be [{n}] or [{n}, {k}], got shape {targets.shape}")
    if targets.ndim == 2:
        if not np.isin(targets, (0, 1)).all():
            raise ValueError("multi-label targets must be 0/1")
        return probs, targets.astype(np.int64)
    if not np.array_equal(targets, np.round(targets)) or targets.min() < 0 or targets.max() >= k:
        raise ValueError(f"targets must be class ids in [0, {k})")
    sums = probs.sum(axis=1)  # [N]
    if np.abs(sums - 1).max() > _SUM_TOLERANCE:
        raise ValueError("single-label probs rows must sum to 1 (softmax outputs)")
    return probs / sums[:, None], targets.astype(np.int64)


def build_report(
    probs: object,
    targets: object,
    classes: Sequence[str],
    *,
    threshold: float | Sequence[float] = 0.5,
    n_bins: int = DEFAULT_BINS,
    temperature: bool = False,
    max_mistakes: int = 16,
) -> EvaluationReport:
    """Score predictions against targets.

    Args:
        probs: [N, K] softmax (single-label) or sigmoid (multi-label) probabilities.
        targets: [N] class ids (single-label) or [N, K] 0/1 labels (multi-label).
        classes: K class names.
        threshold: multi-label decision threshold, one for all labels or one per label.
        n_bins: reliability bins for the ECE (single-label).
        temperature: also fit a temperature on these predictions (single-label) and report
            NLL and ECE before and after.
        max_mistakes: how many of the most confident mistakes to list.
    """
    classes = list(classes)
    probs, targets = check_inputs(probs, targets, classes)
    multi_label = targets.ndim == 2
    thresholds = None
    with warnings.catch_warnings():
        # Undefined scores become NaN with a note of our own; sklearn's warnings would repeat it.
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        if multi_label:
            thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(classes),))
            scores = multilabel_scores(probs, targets, classes, thresholds)
        else:
            scores = multiclass_scores(probs, targets, classes)
        curves, roc_notes = roc_curves(probs, targets, classes)
    notes = scores.notes + roc_notes
    overall = dict(scores.overall)
    bins = fit = None
    if multi_label:
        if temperature:
            notes.append("temperature scaling is fitted for single-label (softmax) models only")
    else:
        bins = reliability_bins(probs, targets, n_bins)
        overall["ece"] = bins.ece
        if temperature:
            fit = fit_temperature(logits_from_probs(probs), targets, n_bins)
            if fit.at_bound:
                notes.append(
                    f"the fitted temperature {fit.temperature:.4g} is no optimum: an end of the "
                    f"searched range {TEMPERATURE_RANGE} fits as well (e.g. every prediction is "
                    "right and sharpening only helps)"
                )
            notes.append(
                "the temperature was fitted on the evaluated data, so its 'after' numbers are "
                "optimistic; fit on validation and apply to test"
            )
    return EvaluationReport(
        classes=classes,
        multi_label=multi_label,
        num_samples=len(probs),
        overall=overall,
        per_class=scores.per_class,
        confusion=scores.confusion,
        confusion_normalised=None if multi_label else row_normalised(scores.confusion),
        reliability=bins,
        temperature=fit,
        roc=curves,
        mistakes=confident_mistakes(probs, targets, thresholds, max_mistakes),
        threshold=None if thresholds is None else np.array(thresholds),
        notes=notes,
    )


def _number(value: float) -> str:
    return "NaN" if math.isnan(value) else f"{value:.4f}"


def format_table(report: EvaluationReport) -> str:
    """The console view: overall metrics, the per-class table, the temperature and the notes."""
    kind = "multi-label" if report.multi_label else "single-label"
    lines = [f"{report.num_samples} samples, {len(report.classes)} classes ({kind})", ""]
    width = max(len(name) for name in report.overall)
    lines += [f"{name:<{width}}  {_number(v)}" for name, v in report.overall.items()]
    if report.temperature is not None:
        t = report.temperature
        lines.append(
            f"temperature {t.temperature:.4f}: NLL {t.nll_before:.4f} -> {t.nll_after:.4f}, "
            f"ECE {t.ece_before:.4f} -> {t.ece_after:.4f}"
        )
    columns = ["precision", "recall", "specificity", "f1", "auroc"]
    name_width = max(5, *(len(name) for name in report.classes))
    header = f"{'class':<{name_width}}" + "".join(f"  {c:>11}" for c in columns) + "    support"
    lines += ["", header, "-" * len(header)]
    for row in report.per_class.rows():
        cells = "".join(f"  {_number(row[c]):>11}" for c in columns)
        lines.append(f"{row['name']:<{name_width}}{cells}  {row['support']:>9}")
    if report.notes:
        lines += ["", "notes:"] + [f"  - {note}" for note in report.notes]
    return "\n".join(lines)
