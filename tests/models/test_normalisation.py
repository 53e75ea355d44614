"""Per-channel mean/std: as given, repeated, RGB averaged to grey, else a one-line error that
says where the values came from."""

from __future__ import annotations

import pytest
import timm

from vittune.errors import RecipeError
from vittune.models.normalisation import per_channel, resolve_normalisation


def test_per_channel_repeats_one_value_and_averages_rgb_to_grey() -> None:
    assert per_channel([0.5], 4, "data.mean") == (0.5, 0.5, 0.5, 0.5)
    assert per_channel([0.2, 0.4, 0.9], 1, "data.mean") == pytest.approx((0.5,))
    assert per_channel([0.1, 0.2], 2, "data.mean") == (0.1, 0.2)


def test_a_count_that_fits_no_channel_rule_says_where_the_values_came_from() -> None:
    model = timm.create_model(
        "vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, in_chans=4, num_classes=2
    )
    with pytest.raises(RecipeError) as unset:
        resolve_normalisation(model, None, None, 4)
    assert str(unset.value).startswith(
        "data.mean is not set, and the backbone's pretrained default has 3 values, which cannot"
        " describe 4 channels (model.in_chans 4); set data.mean with one value per channel"
    )
    with pytest.raises(RecipeError, match=r"^2 data.std values, which cannot describe 4 channels"):
        resolve_normalisation(model, [0.5] * 4, [0.2, 0.3], 4)
