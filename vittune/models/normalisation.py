"""Per-channel input statistics: one rule for the student, the teacher and every export."""

from __future__ import annotations

from collections.abc import Sequence

import timm.data
from torch import nn

from vittune.errors import RecipeError


def per_channel(
    values: Sequence[float], channels: int, key: str, given: bool = True
) -> tuple[float, ...]:
    """Statistics for `channels` channels: as given, one value repeated, or RGB averaged to grey.

    Any other count (RGB statistics for a 4-channel model, say) has no obvious meaning, so it
    is a one-line error naming the recipe `key` to set instead of a silent guess. `given`:
    whether the recipe set `key` (else the values are the backbone's pretrained defaults).
    """
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if len(values) == 1:
        return values * channels
    if channels == 1:
        return (sum(values) / len(values),)
    source = f"{len(values)} {key} values" if given else (
        f"{key} is not set, and the backbone's pretrained default has {len(values)} values"
    )  # fmt: skip
    raise RecipeError(
        f"{source}, which cannot describe {channels} channels (model.in_chans {channels});"
        f" set {key} with one value per channel, or check model.in_chans against the images"
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
        per_channel(mean or resolved["mean"], in_chans, f"{key}.mean", bool(mean)),
        per_channel(std or resolved["std"], in_chans, f"{key}.std", bool(std)),
    )
