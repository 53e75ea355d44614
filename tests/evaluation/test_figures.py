"""Every figure is written as a PNG that reads back at a plausible size and is not blank."""

from __future__ import annotations

import itertools
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import pytest

from vittune.evaluation.figures import (
    save_confusion_figure,
    save_mistakes_grid,
    save_reliability_diagram,
    save_roc_curves,
)
from vittune.evaluation.report import build_report


def read_png(path: Path, min_side: int = 200) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 5_000
    pixels = mpimg.imread(path)  # [H, W, 4] float in [0, 1]
    assert pixels.ndim == 3 and min(pixels.shape[:2]) >= min_side
    assert pixels[..., :3].std() > 0.05  # something was drawn
    return pixels


@pytest.fixture(scope="module")
def binary_report():
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 100)
    p1 = np.clip(0.4 * targets + 0.6 * rng.random(100), 0.0, 1.0)
    return build_report(np.stack([1 - p1, p1], axis=1), targets, ["benign", "malignant"])


def test_confusion_figure_has_two_panels_even_with_an_absent_class(tmp_path: Path) -> None:
    counts = np.array([[5, 1, 0], [2, 7, 1], [0, 0, 0]])  # class c absent: a NaN row
    path = save_confusion_figure(counts, ["a", "b", "c"], tmp_path / "out" / "confusion.png")
    pixels = read_png(path)
    assert pixels.shape[1] > 1.5 * pixels.shape[0]  # side by side


@pytest.mark.parametrize("figure", ["test report", "training"])
@pytest.mark.parametrize(
    "classes", [["a", "b"], ["benign", "malignant lesion (biopsy proven)", "normal"]]
)
def test_confusion_class_names_are_inside_the_figure_and_clear_of_the_panels(
    classes: list[str], figure: str
) -> None:
    """The margins come from the widest class name: every tick label, axis label and title
    lies inside the figure, and no y label of a right panel overlaps the one on its left."""
    import matplotlib.pyplot as plt
    import torch

    from vittune.evaluation.figures import confusion_figure
    from vittune.tasks.figures import confusion_matrix_figure

    counts = np.arange(len(classes) ** 2).reshape(len(classes), -1)
    title = "a run, test split, 9 images"
    if figure == "test report":
        fig = confusion_figure(counts, classes, title)
    else:
        fig = confusion_matrix_figure(torch.tensor(counts), classes, f"validation: {title}")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = fig.bbox.padded(1)  # one pixel of rounding
    texts = [fig._suptitle] if fig._suptitle is not None else []
    for ax in fig.axes:
        texts += [*ax.get_xticklabels(), *ax.get_yticklabels(), ax.title]
        texts += [ax.xaxis.label, ax.yaxis.label]
    assert len(fig.axes) == (2 if figure == "test report" else 1)
    for text in texts:
        box = text.get_window_extent(renderer)
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1, text.get_text()
        assert inside.y0 <= box.y0 and box.y1 <= inside.y1, text.get_text()
    for left, right in itertools.pairwise(fig.axes):
        for text in [*right.get_yticklabels(), right.yaxis.label]:
            assert text.get_window_extent(renderer).x0 > left.get_window_extent(renderer).x1
    plt.close(fig)


def test_reliability_diagram_and_roc_curves(tmp_path: Path, binary_report) -> None:
    read_png(save_reliability_diagram(binary_report.reliability, tmp_path / "reliability.png"))
    read_png(save_roc_curves(binary_report.roc, tmp_path / "roc.png"))
    with pytest.raises(ValueError, match="no ROC curves"):
        save_roc_curves({}, tmp_path / "none.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_mistakes_grid_grey_and_rgb(tmp_path: Path, channels: int) -> None:
    images = np.random.default_rng(1).random((5, channels, 32, 32))  # [N, C, H, W]
    path = save_mistakes_grid(
        images, ["a"] * 5, ["b"] * 5, [0.91, 0.9, 0.8, 0.7, 0.6], tmp_path / "mistakes.png"
    )
    read_png(path)
    with pytest.raises(ValueError, match="one title entry per image"):
        save_mistakes_grid(images, ["a"], ["b"], [0.9], tmp_path / "bad.png")


def test_reliability_gap_looks_like_its_legend_on_both_sides() -> None:
    """Gap boxes span accuracy..confidence whichever is higher and are drawn unfilled, so
    their colour is the legend's even over an accuracy bar; the calibrated curve is drawn
    with `--temperature`, at the bins of softmax(logits / T)."""
    import matplotlib.pyplot as plt

    from vittune.evaluation.calibration import (
        calibrated_bins,
        fit_temperature,
        logits_from_probs,
        reliability_bins,
    )
    from vittune.evaluation.figures import reliability_figure

    rng = np.random.default_rng(2)
    targets = rng.integers(0, 3, 300)
    probs = rng.dirichlet(np.ones(3) * 0.7, size=300)  # [300, 3]
    probs[targets == 0, 0] += 2.0  # class 0: right and under-confident (accuracy > confidence)
    probs /= probs.sum(axis=1, keepdims=True)
    bins = reliability_bins(probs, targets, 10)
    after = calibrated_bins(probs, targets, 0.5, 10)
    fig = reliability_figure(bins, "t", after, 0.5)
    top = fig.axes[0]
    filled = bins.count > 0
    assert (bins.accuracy[filled] > bins.confidence[filled]).any()
    assert (bins.accuracy[filled] < bins.confidence[filled]).any()
    bars, gaps = top.containers
    for patch, acc, conf in zip(gaps, bins.accuracy[filled], bins.confidence[filled], strict=True):
        assert patch.get_facecolor()[3] == 0.0  # unfilled: nothing to blend
        assert patch.get_y() == pytest.approx(min(acc, conf))
        assert patch.get_y() + patch.get_height() == pytest.approx(max(acc, conf))
    handles, labels = top.get_legend_handles_labels()
    legend_gap = handles[labels.index("gap to mean confidence")]
    assert legend_gap.patches[0].get_edgecolor() == gaps.patches[0].get_edgecolor()
    (curve,) = [line for line in top.lines if line.get_label().startswith("after temperature 0.5")]
    kept = after.count > 0
    np.testing.assert_allclose(curve.get_xdata(), after.confidence[kept])
    np.testing.assert_allclose(curve.get_ydata(), after.accuracy[kept])
    plt.close(fig)
    # the curve's ECE is the one the temperature fit reports (its own softmax of logits / T)
    fit = fit_temperature(logits_from_probs(probs), targets, 10)
    assert calibrated_bins(probs, targets, fit.temperature, 10).ece == pytest.approx(fit.ece_after)


def test_mistake_titles_say_which_class_is_true() -> None:
    import matplotlib.pyplot as plt

    from vittune.evaluation.figures import mistakes_figure

    images = np.stack([np.zeros((1, 8, 8)), np.ones((1, 8, 8))])  # black, then white
    fig = mistakes_figure(images, ["8", "3"], ["0", "5"], [0.52, 0.9], columns=2)
    titles = [text.get_text() for ax in fig.axes for text in ax.texts]
    assert titles == ["true 8\npredicted 0 (0.52)", "true 3\npredicted 5 (0.90)"]
    # each image fills the middle of its own cell, below its title: left black, right white
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())[..., :3]  # [H, W, 3] uint8
    height, width = pixels.shape[:2]
    middle = int(height * 0.6)  # below the title band
    assert (pixels[middle, width // 4] == 0).all()
    assert (pixels[middle, 3 * width // 4] == 255).all()
    assert (pixels[middle, width // 2] == 255).all()  # the white gap between the cells
    assert (pixels[2, width // 4] == 255).all()  # the title band above the black image
    plt.close(fig)
