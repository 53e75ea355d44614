"""The predictions file of `vittune predict`: one row per input image, errors included.

An image that cannot be read still gets its row, with the reason in `error` and no
prediction, so the file lines up with the inputs and one bad file never stops a long run.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_TOP_K = 3


def _prob(value: float) -> str:
    return f"{value:.6g}"  # six significant digits: exact enough, still readable


def prediction_header(
    classes: Sequence[str], multi_label: bool, top_k: int, decided: Sequence[str] = ()
) -> list[str]:
    """Column names of the predictions file.

    Single-label: `path, predicted, probability, top1_class, top1_prob, ...` for min(top_k, K)
    classes; multi-label: `path, labels, prob_<label>...`. `error` is last in both, so a reader
    always finds the same columns. `decided`: classes with a saved operating point, each
    given a `decision_<class>` column (1 where its probability reaches the threshold).
    """
    decisions = [f"decision_{name}" for name in decided]
    if multi_label:
        return ["path", "labels", *(f"prob_{name}" for name in classes), *decisions, "error"]
    k = min(top_k, len(classes))
    top = [column for i in range(1, k + 1) for column in (f"top{i}_class", f"top{i}_prob")]
    return ["path", "predicted", "probability", *top, *decisions, "error"]


def prediction_rows(
    paths: Sequence[str | Path],
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    errors: Sequence[str | None] | None = None,
    multi_label: bool = False,
    threshold: float | Sequence[float] = 0.5,
    top_k: int = DEFAULT_TOP_K,
    operating: dict[str, float] | None = None,
) -> list[dict[str, str]]:
    """One dict per path with the columns of `prediction_header`.

    Args:
        paths: N image paths, as they should appear in the file.
        probs: [N, K] probabilities; rows of images with an error are ignored (may be NaN).
        classes: K class names.
        errors: N messages, None where the image was read; a row with a message has no
            prediction.
        multi_label: list every label with p > threshold (as in training) instead of top-k.
        threshold: multi-label threshold, one for all labels or one per label.
        top_k: how many ranked classes to list (at most K).
        operating: {class: threshold} of the run's operating point (`operating_point.json`).
    """
    probs = np.asarray(probs, dtype=np.float64)
    errors = list(errors) if errors is not None else [None] * len(paths)
    if probs.shape != (len(paths), len(classes)) or len(errors) != len(paths):
        raise ValueError(
            f"need one probs row and one error entry per path: {len(paths)} paths, "
            f"probs {probs.shape}, {len(errors)} errors, {len(classes)} classes"
        )
    operating = {n: t for n, t in (operating or {}).items() if t is not None and n in classes}
    header = prediction_header(classes, multi_label, top_k, list(operating))
    k = min(top_k, len(classes))
    thresholds = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (len(classes),))
    rows = []
    for path, row, error in zip(paths, probs, errors, strict=True):
        record = dict.fromkeys(header, "")
        record["path"] = str(path)
        if error:
            record["error"] = " ".join(str(error).split())  # one line per row
        elif multi_label:
            chosen = np.flatnonzero(row > thresholds)  # [L] labels above their threshold
            record["labels"] = ";".join(classes[c] for c in chosen)
            record.update({f"prob_{n}": _prob(p) for n, p in zip(classes, row, strict=True)})
        else:
            ranked = np.argsort(-row, kind="stable")[:k]  # [k] ties: first class, as argmax
            record["predicted"] = classes[ranked[0]]
            record["probability"] = _prob(row[ranked[0]])
            for i, c in enumerate(ranked, start=1):
                record[f"top{i}_class"], record[f"top{i}_prob"] = classes[c], _prob(row[c])
        if not error:
            for name, cut in operating.items():
                record[f"decision_{name}"] = str(int(row[list(classes).index(name)] >= cut))
        rows.append(record)
    return rows


def write_predictions(
    out: str | Path,
    paths: Sequence[str | Path],
    probs: np.ndarray,
    classes: Sequence[str],
    *,
    errors: Sequence[str | None] | None = None,
    multi_label: bool = False,
    threshold: float | Sequence[float] = 0.5,
    top_k: int = DEFAULT_TOP_K,
    operating: dict[str, float] | None = None,
) -> Path:
    """Write `prediction_rows(...)` as CSV to `out` (folders created); returns the path."""
    rows = prediction_rows(
        paths,
        probs,
        classes,
        errors=errors,
        multi_label=multi_label,
        threshold=threshold,
        top_k=top_k,
        operating=operating,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["path"])
        writer.writeheader()
        writer.writerows(rows)
    return out
