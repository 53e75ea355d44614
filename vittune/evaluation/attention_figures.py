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
    fig = attention_figure(pixels, heads, rollout, title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def attention_figure(
    pixels: np.ndarray, heads: np.ndarray, rollout: np.ndarray, title: str = ""
) -> plt.Figure:
    """The input, the mean class-token map, the rollout and each head, with a colour bar."""
    shown = heads[:MAX_HEADS_SHOWN]
    columns = max(3, len(shown))
    fig, axes = plt.subplots(
        2, columns, figsize=(2.6 * columns + 1.0, 5.8), squeeze=False, layout="constrained"
    )
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
            shade = ax.imshow(overlay, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(name, fontsize=9, wrap=True)
    for k, (ax, head) in enumerate(zip(axes[1], shown, strict=False)):
        ax.imshow(**_show(pixels))
        ax.imshow(head, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
        ax.set_title(f"head {k}", fontsize=9)
    bar = fig.colorbar(shade, ax=axes, shrink=0.8)
    bar.set_label("attention (each map scaled to [0, 1])", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def display_image(
    normalised: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> np.ndarray:
    """Undo the normalisation of a [C, H, W] batch item for display, in [0, 1]."""
    m = torch.tensor(mean).view(-1, 1, 1)
    s = torch.tensor(std).view(-1, 1, 1)
    return (normalised.cpu() * s + m).clamp(0, 1).numpy()
