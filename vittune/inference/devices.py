"""The torch device a command's `--device` names, checked before any work is done."""

from __future__ import annotations

import torch

from vittune.errors import RecipeError


def device_for(choice: str = "auto") -> torch.device:
    """The torch device `--device` names; a user error when it names none, or one not here."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(choice)
    except (RuntimeError, ValueError):
        raise RecipeError(f"--device must be auto, cpu, cuda or cuda:N, got {choice!r}") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise RecipeError(f"--device {choice}: no CUDA GPU is visible here; use --device cpu")
        if device.index is not None and device.index >= count:
            raise RecipeError(
                f"--device {choice}: only {count} GPU(s) are visible (cuda:0 to cuda:{count - 1})"
            )
    elif device.type != "cpu":
        raise RecipeError(f"--device must be auto, cpu, cuda or cuda:N, got {choice!r}")
    return device
