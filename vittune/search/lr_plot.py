"""The range test's figure and numbers: loss against optim.lr, and every group's lr beside it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

from vittune.training.run_folder import atomic_write

if TYPE_CHECKING:
    from vittune.search.results import RangeTest


def write_plot(result: RangeTest, path: Path) -> Path:
    """Save the figure at `path` and the numbers in a CSV beside it; the CSV's path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    left.plot(result.lrs, result.losses, color="0.75", lw=1, label="loss")
    left.plot(result.lrs, result.smoothed, color="C0", lw=2, label="smoothed loss")
    if result.suggestion is not None:
        left.axvline(
            result.suggestion, color="C3", ls="--", label=f"suggested {result.suggestion:.2g}"
        )
    left.set(xscale="log", xlabel="optim.lr", ylabel="training loss", title="LR range test")
    finite = [v for v in result.losses if v == v and abs(v) != float("inf")]
    if finite:  # the smoothed curve decides the scale; spikes of the raw loss are cut off
        top = 1.25 * max(max(result.smoothed[:1] + finite[:1]), max(result.smoothed))
        left.set_ylim(min(finite) - 0.05 * abs(min(finite)), top)
    left.legend()
    # [step][group] -> one line per group: parallel lines on log axes = ratios kept
    for index, name in enumerate(result.group_names):
        lrs = [step[index] for step in result.group_lrs]
        right.plot(result.lrs, lrs, lw=1, label=f"{name} (x{result.scales[index]:.3g})")
    right.set(xscale="log", yscale="log", xlabel="optim.lr", ylabel="group lr")
    right.set_title("each group's lr (layer decay kept)")
    right.legend(fontsize="x-small", ncol=1 + len(result.group_names) // 12)
    figure.tight_layout()
    atomic_write(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    plt.close(figure)
    csv_path = path.with_suffix(".csv")

    def write(temp: Path) -> None:
        with temp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "optim.lr", "loss", "smoothed", *result.group_names])
            for step, lr in enumerate(result.lrs):
                row = [result.losses[step], result.smoothed[step], *result.group_lrs[step]]
                writer.writerow([step, lr, *row])

    atomic_write(csv_path, write)
    return csv_path
