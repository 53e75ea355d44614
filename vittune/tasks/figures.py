"""Figures a task saves into the run folder during training, and their logging to W&B."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import Logger, WandbLogger  # noqa: E402

from vittune.evaluation.panel_layout import confusion_panels  # noqa: E402


def save_confusion_matrix(
    matrix: torch.Tensor, classes: list[str], path: Path, title: str = ""
) -> Path:
    """`confusion_matrix_figure` written to `path`, its title in the PNG's metadata."""
    fig = confusion_matrix_figure(matrix, classes, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Title": title})  # readable without looking
    plt.close(fig)
    return path


def confusion_matrix_figure(matrix: torch.Tensor, classes: list[str], title: str) -> plt.Figure:
    """Row-normalised heat map with raw counts written in each cell."""
    counts = matrix.detach().cpu().to(torch.long)
    rates = counts.float() / counts.sum(dim=1, keepdim=True).clamp(min=1)
    n = len(classes)
    fig = plt.figure()
    (ax,) = confusion_panels(fig, classes, [title], False, side=min(1.5 + 0.5 * n, 12.0))
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
    return fig


def save_mae_grid(columns: dict[str, torch.Tensor], path: Path, title: str = "") -> Path:
    """One row per image, one column per named stage (original, masked, reconstruction...).

    Every tensor is [B, C, H, W] with values in [0, 1]; one channel shows in grey, three
    as RGB, any other count as the channel mean in grey.
    """
    names = list(columns)
    rows = min(len(t) for t in columns.values())
    fig, axes = plt.subplots(
        rows,
        len(names),
        figsize=(1.8 * len(names), 1.8 * rows + 0.4),
        squeeze=False,
        layout="constrained",  # keeps the title clear of the column names
    )
    for col, name in enumerate(names):
        images = columns[name].detach().float().cpu()
        for row in range(rows):
            image = images[row]  # [C, H, W]
            ax = axes[row][col]
            if image.shape[0] == 3:
                ax.imshow(image.permute(1, 2, 0).numpy())
            else:
                ax.imshow(image.mean(dim=0).numpy(), cmap="gray", vmin=0.0, vmax=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def log_image(loggers: list[Logger], key: str, path: Path, step: int | None = None) -> None:
    """Send a saved PNG to every logger that takes images (W&B); the file stays in the run folder."""
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=step)
