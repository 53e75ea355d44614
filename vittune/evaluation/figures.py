"""Evaluation figures saved as PNG: confusion matrices, reliability diagram, ROC, mistakes.

`vittune.tasks.figures` draws the single validation heat map during training; these are the fuller
figures of `vittune evaluate`, drawn from an `EvaluationReport`'s parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from vittune.evaluation.calibration import ReliabilityBins  # noqa: E402
from vittune.evaluation.panel_layout import confusion_panels  # noqa: E402
from vittune.evaluation.roc import RocCurve  # noqa: E402

# Beyond this many classes the cell numbers are unreadable; the colours still show.
_MAX_ANNOTATED_CLASSES = 30


# Fixed margins for the figures whose labels are fixed words: the layout engines measure
# every text to place the axes, which took half of each figure's time (0.1-0.2 s a figure).
# The confusion matrix measures its class names once instead (`confusion_panels`).
_FIXED_MARGINS = {"left": 0.14, "right": 0.96, "bottom": 0.1, "top": 0.92, "hspace": 0.08}


# A mistakes-grid cell in inches: width, height, and the band for its two-line title on top.
_MISTAKE_CELL = (2.2, 2.4, 0.4)


def _save(fig: plt.Figure, path: Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def _heat_map(ax: plt.Axes, values: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
    """One [K, K] panel; NaN cells (rows of absent classes) are grey, not 'zero'."""
    cmap = plt.get_cmap("Blues").with_extremes(bad="lightgrey")
    scaled = values / np.nanmax(values) if np.nanmax(values) > 0 else values
    ax.imshow(np.ma.masked_invalid(scaled), cmap=cmap, vmin=0.0, vmax=1.0)
    n = len(classes)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= _MAX_ANNOTATED_CLASSES:
        for i in range(n):
            for j in range(n):
                colour = "white" if scaled[i, j] > 0.5 else "black"
                ax.text(
                    j, i, labels[i, j], ha="center", va="center", color=colour, fontsize=7,
                    in_layout=False,  # inside its cell: the layout need not measure it
                )  # fmt: skip


def save_confusion_figure(
    counts: np.ndarray, classes: Sequence[str], path: Path, title: str = ""
) -> Path:
    """`confusion_figure` written to `path`."""
    return _save(confusion_figure(counts, classes, title), path)


def confusion_figure(counts: np.ndarray, classes: Sequence[str], title: str = "") -> plt.Figure:
    """Counts and row-normalised rates side by side (rows: true class, columns: predicted)."""
    counts = np.asarray(counts)  # [K, K]
    totals = counts.sum(axis=1, keepdims=True)  # [K, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(totals > 0, counts / totals, np.nan)  # [K, K], NaN for absent classes
    fig = plt.figure()
    titles = ("counts", "row-normalised (recall on the diagonal)")
    side = min(2.0 + 0.4 * len(classes), 9.6)  # inches a panel
    left, right = confusion_panels(fig, classes, titles, bool(title), side)
    _heat_map(left, counts.astype(float), counts.astype(str), classes)
    rate_text = np.where(np.isnan(rates), "", np.char.mod("%.2f", np.nan_to_num(rates)))
    _heat_map(right, rates, rate_text, classes)
    for ax, name in zip((left, right), titles, strict=True):
        ax.set_title(name)
    if title:
        fig.suptitle(title, y=1 - 0.08 / fig.get_figheight(), va="top")
    return fig


def save_reliability_diagram(
    bins: ReliabilityBins,
    path: Path,
    title: str = "",
    calibrated: ReliabilityBins | None = None,
    temperature: float | None = None,
) -> Path:
    """Accuracy per confidence bin against the diagonal, sample counts below, ECE in the title;
    with `calibrated` (the bins after temperature scaling) its curve too."""
    return _save(reliability_figure(bins, title, calibrated, temperature), path)


def reliability_figure(
    bins: ReliabilityBins,
    title: str = "",
    calibrated: ReliabilityBins | None = None,
    temperature: float | None = None,
) -> plt.Figure:
    """The reliability diagram as a figure (see `save_reliability_diagram`).

    The gap between accuracy and mean confidence is an unfilled hatched box from the lower to
    the higher of the two, so it looks like its legend entry whichever side it lies on (a
    translucent fill over the accuracy bar would blend into another colour).
    """
    lo, hi = bins.edges[:-1], bins.edges[1:]  # [M]
    width = hi - lo
    filled = bins.count > 0
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5, 6), sharex=True, height_ratios=(3, 1),
        gridspec_kw={**_FIXED_MARGINS, "top": 0.9},  # the title takes two lines
    )  # fmt: skip
    accuracy, confidence = bins.accuracy[filled], bins.confidence[filled]
    top.bar(lo[filled], accuracy, width[filled], align="edge", edgecolor="black", label="accuracy")
    top.bar(
        lo[filled],
        np.abs(confidence - accuracy),
        width[filled],
        bottom=np.minimum(confidence, accuracy),
        align="edge",
        facecolor="none",
        edgecolor="tab:red",
        hatch="//",
        label="gap to mean confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    if calibrated is not None:
        kept = calibrated.count > 0
        top.plot(
            calibrated.confidence[kept],
            calibrated.accuracy[kept],
            "o-",
            color="tab:green",
            label=f"after temperature {temperature:.3g} (ECE {calibrated.ece:.4f})"
            if temperature is not None
            else f"calibrated (ECE {calibrated.ece:.4f})",
        )
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(loc="upper left", fontsize=8)
    top.set_title(f"{title + chr(10) if title else ''}ECE {bins.ece:.4f} ({len(width)} bins)")
    bottom.bar(lo, bins.count, width, align="edge", color="grey", edgecolor="black")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("top-1 confidence")
    bottom.set_ylabel("samples")
    return fig


def save_roc_curves(curves: dict[str, RocCurve], path: Path, title: str = "") -> Path:
    """One ROC curve per entry, its AUC in the legend; the chance diagonal for reference."""
    if not curves:
        raise ValueError("no ROC curves to draw")
    fig, ax = plt.subplots(figsize=(5.5, 5), gridspec_kw=_FIXED_MARGINS)
    for name, curve in curves.items():
        ax.plot(curve.fpr, curve.tpr, linewidth=1.5, label=f"{name} (AUC {curve.auc:.4f})")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="chance")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (1 - specificity)")
    ax.set_ylabel("true-positive rate (sensitivity)")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title or "ROC")
    return _save(fig, path)


def save_mistakes_grid(
    images: np.ndarray,
    true: Sequence[str],
    predicted: Sequence[str],
    probability: Sequence[float],
    path: Path,
    columns: int = 4,
) -> Path:
    """`mistakes_figure` written to `path`."""
    return _save(mistakes_figure(images, true, predicted, probability, columns), path)


def mistakes_figure(
    images: np.ndarray,
    true: Sequence[str],
    predicted: Sequence[str],
    probability: Sequence[float],
    columns: int = 4,
) -> plt.Figure:
    """A grid of images titled "true X" over "predicted Y (p)", e.g. the report's confident
    mistakes.

    Every tile and title is drawn in one axes whose data units are the figure's inches: an axes
    per image (16 for the report) took 0.25-0.4 s to create, most of the report's drawing time.

    Args:
        images: [N, C, H, W] in [0, 1]; one channel shows grey, three RGB, others the mean.
        true: N true class names.
        predicted: N predicted class names.
        probability: N probabilities of the predicted class.
        columns: images per row.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or not len(images) == len(true) == len(predicted) == len(probability):
        raise ValueError("images must be [N, C, H, W] with one title entry per image")
    rows = max(1, -(-len(images) // columns))
    width, height, title = _MISTAKE_CELL  # inches per grid cell; the title band on top
    fig = plt.figure(figsize=(width * columns, height * rows))
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    box = min(width, height - title) * 0.94  # the image's longest side, a small gap around it
    for index, image in enumerate(np.clip(images, 0.0, 1.0)):  # [C, H, W]
        row, column = divmod(index, columns)
        centre_x, top = (column + 0.5) * width, row * height + title
        scale = box / max(image.shape[1:])
        half_w, tall = image.shape[2] * scale / 2, image.shape[1] * scale
        extent = (centre_x - half_w, centre_x + half_w, top + tall, top)  # left, right, bottom, top
        if image.shape[0] == 3:
            ax.imshow(image.transpose(1, 2, 0), extent=extent)  # [H, W, 3]
        else:
            ax.imshow(image.mean(axis=0), cmap="gray", vmin=0.0, vmax=1.0, extent=extent)
        ax.text(
            centre_x, top - 0.03,
            f"true {true[index]}\npredicted {predicted[index]} ({probability[index]:.2f})",
            ha="center", va="bottom", fontsize=8,
        )  # fmt: skip
    ax.set_xlim(0.0, width * columns)
    ax.set_ylim(height * rows, 0.0)  # y grows downwards, as rows do
    ax.set_aspect("auto")  # the limits are already the figure's inches: one unit is one unit
    return fig
