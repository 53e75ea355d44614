"""Figures saved into the run folder (and logged to W&B): confusion matrices."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def save_confusion_matrix(
    matrix: torch.Tensor, classes: list[str], path: Path, title: str = ""
) -> Path:
    """Row-normalised heat map with raw counts written in each cell."""
    counts = matrix.detach().cpu().to(torch.long)
    rates = counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    size = min(2.0 + 0.6 * n, 16.0)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                colour = "white" if rates[i, j] > 0.5 else "black"
                ax.text(
                    j, i, str(int(counts[i, j])), ha="center", va="center", color=colour, fontsize=8
                )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
