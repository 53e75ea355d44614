"""Where the panels of a confusion-matrix figure go, measured from their class names.

Both confusion figures (the validation heat map drawn during training and the test report's
counts + rates) use it; it needs only matplotlib, so the training-time import stays light.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties


def confusion_panels(
    fig: Figure, classes: Sequence[str], titles: Sequence[str], titled: bool, side: float
) -> tuple[Axes, ...]:
    """Square panels `side` inches wide in a row, one per title, with room around them for the
    class names and panel titles (and a figure title when `titled`), sized from the widest as
    matplotlib's own renderer measures them. One measurement instead of a layout engine (which
    measures every text of every panel, twice): the figure grows with the names rather than
    the panels shrinking."""
    renderer = fig.canvas.get_renderer()

    def inches(texts: Sequence[str], size_key: str) -> tuple[float, float]:  # widest, tallest
        font = FontProperties(size=matplotlib.rcParams[size_key])
        sizes = [renderer.get_text_width_height_descent(t, font, ismath=False) for t in texts]
        return max(w for w, _, _ in sizes) / fig.dpi, max(h for _, h, _ in sizes) / fig.dpi

    name_w, name_h = inches([str(c) for c in classes], "xtick.labelsize")
    title_w, title_h = inches(list(titles), "axes.titlesize")
    line = (
        FontProperties(size=matplotlib.rcParams["axes.labelsize"]).get_size_in_points() / 72 * 1.4
    )
    ticks = 0.12  # tick mark and its padding
    overhang = max(0.0, (title_w - side) / 2)  # a panel title wider than its panel
    left = 0.1 + max(line + name_w + ticks, overhang)  # axis label, names, ticks
    gap = max(left, 2 * overhang + 0.1)
    right = 0.25 + overhang
    bottom = 0.1 + line + (name_w + name_h) * np.sqrt(0.5) + ticks  # names at 45 degrees
    top = 0.15 + 1.6 * title_h + (2 * line if titled else 0.0)  # panel titles, the figure's
    count = len(titles)
    width = left + count * side + (count - 1) * gap + right
    height = bottom + side + top
    fig.set_size_inches(width, height)
    return tuple(
        fig.add_axes(
            ((left + i * (side + gap)) / width, bottom / height, side / width, side / height)
        )
        for i in range(count)
    )
