"""Per-channel input statistics: one rule for the student, the teacher and every export."""

from __future__ import annotations

from collections.abc import Sequence

import timm.data
from torch import nn

from vittune.errors import RecipeError


def per_channel(values: Sequence[float], channels: int, key: str) -> tuple[float, ...]:
    """Statistics for `channels` channels: as given, one value repeated, or RGB averaged to grey.

    Any other count (RGB statistics for a 4-channel model, say) has no obvious meaning, so it
    is a one-line error naming the recipe `key` to set instead of a silent guess.
    """
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    raise RecipeError(
        f"{len(values)} {key} values cannot describe {channels} channels; set {key} with one value per channel"
    )


def resolve_normalisation(
    model: nn.Module,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    in_chans: int,
    key: str = "data",
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The recipe's mean/std where given, else the backbone's pretrained config (timm's resolver)."""
    resolved = timm.data.resolve_model_data_config(model)
    return (
        per_channel(mean or resolved["mean"], in_chans, f"{key}.mean"),
        per_channel(std or resolved["std"], in_chans, f"{key}.std"),
    )
