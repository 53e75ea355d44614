"""Augmentation presets and explicit albumentations lists on float images of 1 or 3 channels."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2
from helpers import write_png

from vittune.data.decode import read_image, to_float
from vittune.data.transforms import (
    build_eval_transform,
    build_train_transform,
    normalise_to_tensor,
    seed_augmentation,
)
from vittune.errors import RecipeError
from vittune.recipe.schema import AugmentConfig

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("preset", ["none", "light", "strong", "medical"])
@pytest.mark.parametrize("channels", [1, 3])
def test_presets_give_model_sized_float_tensors(preset: str, channels: int) -> None:
    mean, std = (0.5,) * channels, (0.25,) * channels
    transform = build_train_transform(AugmentConfig(preset=preset), (16, 24), mean, std)
    image = RNG.random((40, 30, channels)).astype(np.float32)
    for _ in range(5):  # random ops differ per call; each call must give a valid sample
        out = transform(image=image)["image"]
        assert out.shape == (channels, 16, 24) and out.dtype == torch.float32
        assert torch.isfinite(out).all()
        # inputs in [0, 1] stay in [0, 1] before normalisation
        assert (out * 0.25 + 0.5).min() >= -1e-5 and (out * 0.25 + 0.5).max() <= 1 + 1e-5


def test_none_is_deterministic_and_light_augments() -> None:
    image = RNG.random((32, 32, 1)).astype(np.float32)
    plain = build_train_transform(AugmentConfig(preset="none"), 32, (0.0,), (1.0,))
    torch.testing.assert_close(
        plain(image=image)["image"], torch.from_numpy(image).permute(2, 0, 1)
    )
    light = build_train_transform(AugmentConfig(preset="light"), 32, (0.0,), (1.0,))
    outputs = [light(image=image)["image"] for _ in range(4)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:])


def test_eval_transform_resizes_and_normalises_exactly() -> None:
    image = RNG.random((8, 8, 3)).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = build_eval_transform(8, mean, std)(image=image)["image"]  # same size: no resampling
    expected = (torch.from_numpy(image) - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(out, expected.permute(2, 0, 1), rtol=1e-5, atol=1e-5)
    assert build_eval_transform((12, 20), mean, std)(image=image)["image"].shape == (3, 12, 20)


def test_16bit_levels_survive_resize_and_normalisation() -> None:
    # A 16-bit image decoded to [0, 1]: levels 1/65535 apart must stay apart after the pipeline.
    levels = (30000 + np.arange(64, dtype=np.float32).reshape(8, 8)) / 65535.0
    out = build_eval_transform(8, (0.0,), (1.0,))(image=levels[:, :, None])["image"][0]
    np.testing.assert_allclose(out.numpy() * 65535.0, levels * 65535.0, atol=1e-2)
    assert len(torch.unique(out)) == 64


def test_explicit_transform_list_replaces_the_preset() -> None:
    cfg = AugmentConfig.model_validate(
        {"preset": "strong", "transforms": [{"name": "VerticalFlip", "p": 1.0}]}
    )
    transform = build_train_transform(cfg, 8, (0.0,), (1.0,))
    image = RNG.random((8, 8, 1)).astype(np.float32)
    torch.testing.assert_close(
        transform(image=image)["image"][0], torch.from_numpy(image[::-1, :, 0].copy())
    )


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"name": "VerticalFlp"}, "did you mean VerticalFlip?"),
        ({"name": "Compose"}, "unknown albumentations transform"),  # not a transform
        ({"name": "VerticalFlip", "probability": 1.0}, "VerticalFlip"),
        ({"name": "GaussianBlur", "blur_limit": "big"}, "is invalid"),
    ],
)
def test_bad_explicit_transforms_are_recipe_errors(spec: dict, expected: str) -> None:
    cfg = AugmentConfig.model_validate({"transforms": [spec]})
    with pytest.raises(RecipeError) as info:
        build_train_transform(cfg, 8, (0.0,), (1.0,))
    assert expected in str(info.value) and "\n" not in str(info.value)


def twelve_bit_scans(folder: Path, count: int) -> list[np.ndarray]:
    """Smooth anatomy-like 12-bit images (levels 0..4095) stored in 16-bit PNGs, decoded the
    default way (`intensity: dtype`), so they use 1/16 of [0, 1]."""
    rows, cols = np.mgrid[0:40, 0:40] / 40.0
    images = []
    for k in range(count):
        body = np.exp(-((rows - 0.5) ** 2 + (cols - 0.4 - 0.02 * k) ** 2) / 0.08)
        levels = np.round(4095 * (0.15 + 0.8 * body * (0.7 + 0.3 * rows))).astype(np.uint16)
        images.append(read_image(write_png(folder / f"scan{k}.png", levels), in_chans=1))
    assert max(float(i.max()) for i in images) <= 4095 / 65535
    return images


def test_medical_preset_keeps_12bit_scans_in_16bit_files_informative(tmp_path: Path) -> None:
    # Albumentations shifts brightness by up to 0.1 of full scale (1.0 for floats): on 12-bit
    # data that wiped an image to a constant in about 1 draw of 10. The preset now works in
    # each image's own range.
    medical = build_train_transform(AugmentConfig(preset="medical"), 32, (0.0,), (1.0,))
    seed_augmentation(medical, np.random.SeedSequence(0))
    for image in twelve_bit_scans(tmp_path, 4):
        for _ in range(100):
            out = medical(image=image)["image"].numpy()
            assert out.std() > 0.1 * image.std()  # never a constant, never flattened
            # dim stays dim: nothing brighter than the image was (the affine fills borders with 0)
            assert out.min() >= 0.0 and out.max() <= image.max() + 1e-6


def test_medical_preset_treats_a_12bit_scan_like_its_full_range_twin(tmp_path: Path) -> None:
    # Same random draws, same image at two scales: the outputs differ only by that scale, so
    # every structure the full-range image keeps, the 12-bit one keeps too (and 8-bit and
    # full-range 16-bit images are augmented as albumentations always did).
    pipelines = [
        build_train_transform(AugmentConfig(preset="medical"), 32, (0.0,), (1.0,)) for _ in "ab"
    ]
    for k, scan in enumerate(twelve_bit_scans(tmp_path, 3)):
        full = scan * np.float32(65535 / 4095)
        for draw in range(20):
            for pipeline in pipelines:
                seed_augmentation(pipeline, np.random.SeedSequence([k, draw]))
            dim = pipelines[0](image=scan)["image"].numpy()
            bright = pipelines[1](image=full)["image"].numpy()
            np.testing.assert_allclose(dim * (65535 / 4095), bright, atol=1e-5)
            assert np.corrcoef(dim.ravel(), bright.ravel())[0, 1] > 0.9999


def test_seeded_pipelines_repeat_and_seeds_differ() -> None:
    image = RNG.random((32, 32, 3)).astype(np.float32)
    outputs = {}
    for seed in (0, 0, 1):
        strong = build_train_transform(AugmentConfig(preset="strong"), 16, (0.0,) * 3, (1.0,) * 3)
        seed_augmentation(strong, np.random.SeedSequence(seed))
        outputs.setdefault(seed, []).append(
            torch.stack([strong(image=image)["image"] for _ in "abcd"])
        )
    torch.testing.assert_close(outputs[0][0], outputs[0][1], rtol=0, atol=0)
    assert not torch.equal(outputs[0][0], outputs[1][0])


def _twin_pipelines(preset: str, channels: int, seed: int = 3) -> tuple:
    """Two identically seeded copies of a preset: one fed integers, one fed floats."""
    twins = []
    for _ in range(2):
        pipeline = build_train_transform(
            AugmentConfig(preset=preset), (24, 20), (0.0,) * channels, (1.0,) * channels
        )
        seed_augmentation(pipeline, np.random.SeedSequence(seed))
        twins.append(pipeline)
    return tuple(twins)


@pytest.mark.parametrize("preset", ["none", "light", "strong", "medical"])
@pytest.mark.parametrize(
    ("dtype", "shape", "in_chans", "intensity"),
    [
        (np.uint8, (50, 40, 3), 3, "dtype"),
        (np.uint8, (50, 40, 3), 1, "dtype"),  # luma after the crop
        (np.uint8, (50, 40, 4), 3, "dtype"),  # alpha dropped
        (np.uint16, (50, 40), 1, "dtype"),
        (np.uint16, (50, 40), 3, "minmax"),
        (np.int16, (50, 40), 1, "dtype"),  # signed: Affine's fill needs the float path
    ],
)
def test_the_integer_path_equals_the_float_path_within_one_level(
    preset: str, dtype: type, shape: tuple, in_chans: int, intensity: str
) -> None:
    info = np.iinfo(dtype)
    raw = RNG.integers(info.min // 2, info.max // 2, shape, endpoint=True).astype(dtype)
    raw[0, 0] = info.max // 2 + 7  # outside most crops: minmax must still use the whole image
    reference = to_float(raw, in_chans, intensity)
    low, high = float(raw.min()), float(raw.max())
    level = 1.0 / (high - low if intensity == "minmax" else info.max - info.min)
    integer, floating = _twin_pipelines(preset, in_chans)
    for _ in range(6):  # the same draws on both sides, call after call
        ours = integer.from_raw(raw, in_chans, intensity)["image"]
        expected = floating(image=reference)["image"]
        assert ours.shape == expected.shape == (in_chans, 24, 20)
        # Resampling integers rounds once; strong/medical intensity ops may stretch that by
        # their contrast factor (at most 1.3 here) and the 3x3 sharpen kernel.
        factor = 1.0 if preset in ("none", "light") else 8.0
        torch.testing.assert_close(ours, expected, rtol=0, atol=factor * level + 1e-5)


def test_16bit_images_keep_more_than_8_bits_of_levels_after_augmentation() -> None:
    ramp = np.linspace(20000, 40000, 64 * 64).reshape(64, 64).astype(np.uint16)
    for preset in ("light", "medical"):
        pipeline = build_train_transform(AugmentConfig(preset=preset), 32, (0.0,), (1.0,))
        seed_augmentation(pipeline, np.random.SeedSequence(1))
        out = pipeline.from_raw(ramp, 1)["image"]
        assert out.dtype == torch.float32
        assert len(torch.unique(out)) > 256


def test_normalise_to_tensor_is_albumentations_normalize_and_to_tensor() -> None:
    image = RNG.random((9, 7, 3)).astype(np.float32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = A.Compose([A.Normalize(mean=mean, std=std, max_pixel_value=1.0), ToTensorV2()])
    ours = normalise_to_tensor(image, np.asarray(mean, np.float32), 1 / np.asarray(std, np.float32))
    torch.testing.assert_close(ours, reference(image=image)["image"], rtol=1e-6, atol=1e-6)
    assert ours.is_contiguous()


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.float32, np.float64])
def test_types_opencv_cannot_resample_take_the_float_path(dtype: type) -> None:
    raw = (RNG.random((30, 26)) * 1000).astype(dtype)
    integer, floating = _twin_pipelines("light", 1)
    torch.testing.assert_close(
        integer.from_raw(raw, 1)["image"], floating(image=to_float(raw, 1))["image"]
    )
