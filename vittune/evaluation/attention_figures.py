"""The attention figure: an input, its class-token attention per head and the rollout.

Drawn for `vittune attention` and for the maps saved during training (tasks/callbacks.py).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and in CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

MAX_HEADS_SHOWN = 12


def _show(image: np.ndarray) -> dict:
    """imshow arguments for a [C, H, W] image in [0, 1]."""
    if image.shape[0] == 3:
        return {"X": image.transpose(1, 2, 0)}
    return {"X": image.mean(axis=0), "cmap": "gray", "vmin": 0.0, "vmax": 1.0}


def save_attention_figure(
    pixels: np.ndarray, heads: np.ndarray, rollout: np.ndarray, path: Path, title: str = ""
) -> Path:
    """pixels [C, H, W] in [0, 1]; heads [Hd, H, W]; rollout [H, W] -> one PNG."""
    shown = heads[:MAX_HEADS_SHOWN]
    columns = max(3, len(shown))
    fig, axes = plt.subplots(2, columns, figsize=(2.0 * columns, 4.4), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    panels = [
        ("input", None),
        ("class token, last block (mean of heads)", heads.mean(axis=0)),
        ("attention rollout", rollout),
    ]
    for ax, (name, overlay) in zip(axes[0], panels, strict=False):
        ax.imshow(**_show(pixels))
        if overlay is not None:
            ax.imshow(overlay, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=7)
    for k, (ax, head) in enumerate(zip(axes[1], shown, strict=False)):
        ax.imshow(**_show(pixels))
        ax.imshow(head, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(f"head {k}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def display_image(
    normalised: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """Undo the normalisation of a [C, H, W] batch item for display, in [0, 1]."""
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return (normalised.cpu() * s + m).clamp(0, 1).numpy()
