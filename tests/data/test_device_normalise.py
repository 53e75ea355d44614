"""Training batches as uint8 / uint16, normalised on the device: the same numbers as the
worker-side float path, mixed 8/16-bit folders, the task hook and unchanged checkpoints."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import timm
import torch
from conftest import TINY_VIT, make_class_images

from vittune.data.datamodule import ImageDataModule
from vittune.data.datasets import SkipCorrupt, common_images
from vittune.data.transforms import (
    IntegerNormalise,
    build_train_transform,
    seed_augmentation,
)
from vittune.recipe.schema import AugmentConfig, DataConfig, Recipe
from vittune.tasks.classification import ClassificationTask

RNG = np.random.default_rng(0)
MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _twins(preset: str, mean: tuple, std: tuple) -> tuple:
    """Identically seeded pipelines: one delivering integers, one normalising in the worker."""
    twins = []
    for integers in (True, False):
        pipeline = build_train_transform(AugmentConfig(preset=preset), (24, 20), mean, std)
        pipeline.integers = integers
        seed_augmentation(pipeline, np.random.SeedSequence(7))
        twins.append(pipeline)
    return tuple(twins)


@pytest.mark.parametrize("preset", ["none", "light"])
@pytest.mark.parametrize(
    ("dtype", "shape", "in_chans"),
    [
        (np.uint8, (50, 40, 3), 3),
        (np.uint16, (50, 40), 3),  # grey repeated to RGB on the integers
        (np.uint16, (50, 40), 1),
        (np.uint8, (50, 40, 4), 3),  # alpha dropped
    ],
)
def test_a_batch_normalised_on_the_device_equals_the_worker_path(
    preset: str, dtype: type, shape: tuple, in_chans: int
) -> None:
    mean, std = (MEAN3, STD3) if in_chans == 3 else ((0.3,), (0.7,))
    integer, floating = _twins(preset, mean, std)
    raws = [
        RNG.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype) for _ in "abcdef"
    ]
    delivered = torch.stack([integer.from_raw(raw, in_chans)["image"] for raw in raws])
    assert delivered.dtype == torch.from_numpy(raws[0][:1]).dtype  # neither scaled nor cast
    assert delivered.shape == (6, in_chans, 24, 20)
    expected = torch.stack([floating.from_raw(raw, in_chans)["image"] for raw in raws])
    ours = IntegerNormalise(mean, std)(delivered)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)


def test_only_dtype_intensity_and_presets_without_float_steps_deliver_integers() -> None:
    raw = RNG.integers(0, 255, (30, 30, 3), endpoint=True).astype(np.uint8)
    for preset, intensity, integers in [
        ("light", "dtype", True),
        ("light", "minmax", False),
        ("strong", "dtype", False),
        ("medical", "dtype", False),
    ]:
        pipeline = build_train_transform(AugmentConfig(preset=preset), 16, MEAN3, STD3)
        pipeline.integers = True
        out = pipeline.from_raw(raw, 3, intensity)["image"]
        assert (out.dtype == torch.uint8) is integers, (preset, intensity)
    signed = RNG.integers(-100, 100, (30, 30)).astype(np.int16)  # int16 keeps the float path
    pipeline = build_train_transform(AugmentConfig(preset="light"), 16, (0.5,), (0.5,))
    pipeline.integers = True
    assert pipeline.from_raw(signed, 1)["image"].dtype == torch.float32
    # RGB to one channel is a weighted sum, left to the float path
    assert pipeline.from_raw(raw, 1)["image"].dtype == torch.float32


def test_mixed_batches_share_one_representation_without_changing_meaning() -> None:
    normalise = IntegerNormalise((0.5,), (0.25,))
    eight = torch.tensor([[[0, 1, 128, 255]]], dtype=torch.uint8)
    sixteen = torch.tensor([[[0, 300, 40000, 65535]]], dtype=torch.uint16)
    target = torch.tensor(0)
    images, _ = SkipCorrupt(normalise=normalise)([(eight, target), None, (sixteen, target)])
    assert images.dtype == torch.uint16
    assert images[0].tolist() == [[[0, 257, 128 * 257, 65535]]]  # v / 255 == 257 v / 65535
    torch.testing.assert_close(normalise(images)[0], normalise(eight[None])[0], rtol=0, atol=1e-6)
    # next to a float image (already normalised in the worker), integers are normalised there
    floating = normalise(sixteen[None])[0]
    items = common_images([(eight, target), (floating, target)], normalise)
    assert items[0][0].dtype == torch.float32
    torch.testing.assert_close(items[0][0], normalise(eight[None])[0], rtol=0, atol=0)
    assert items[1][0] is floating


def test_a_folder_of_8_and_16_bit_images_gives_the_float_paths_batches(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 3, "b": 3}, size=20, dtype=np.uint8)
    make_class_images(tmp_path / "d", {"a": 3, "b": 3}, size=20, dtype=np.uint16, seed=1)
    for path in list((tmp_path / "d").rglob("*.png"))[::2]:  # 16-bit files under other names
        path.rename(path.with_name("x" + path.name))
    cfg = DataConfig(root=str(tmp_path / "d"), val_fraction=0.3, num_workers=0, batch_size=8)
    batches = []
    for integers in (True, False):
        module = ImageDataModule(cfg, AugmentConfig(preset="light"), 16, (0.4,), (0.2,), 3)
        module.train_transform.integers = integers
        torch.manual_seed(0)  # the same shuffle and augmentation seed
        batches.append(list(module.train_dataloader()))
    dtypes = set()
    for (images, targets), (expected, expected_targets) in zip(*batches, strict=True):
        dtypes.add(images.dtype)
        assert not images.is_floating_point() and images.shape[1] == 3
        torch.testing.assert_close(targets, expected_targets)
        torch.testing.assert_close(module.normalise(images), expected, rtol=0, atol=1e-6)
    assert torch.uint16 in dtypes  # the batches did mix the two depths


def _task(recipe: Recipe) -> ClassificationTask:
    model = timm.create_model(
        TINY_VIT["name"], num_classes=2, img_size=32, patch_size=8, **TINY_VIT["kwargs"]
    )
    return ClassificationTask(recipe, model, ["a", "b"])


def test_the_task_normalises_integer_batches_and_keeps_its_checkpoint_keys() -> None:
    recipe = Recipe.model_validate({"data": {"builtin": "digits"}})
    task = _task(recipe)
    keys = list(task.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    targets = torch.tensor([0, 1])
    with pytest.raises(RuntimeError, match="nothing normalises it"):
        task.on_after_batch_transfer([images, targets], 0)
    task.input_normalise = IntegerNormalise(MEAN3, STD3)
    out, out_targets = task.on_after_batch_transfer([images, targets], 0)
    torch.testing.assert_close(out, task.input_normalise(images), rtol=0, atol=0)
    assert out.dtype == torch.float32 and out_targets is targets
    floats = [torch.randn(2, 3, 32, 32), targets]  # evaluation batches pass through as they are
    assert task.on_after_batch_transfer(floats, 0)[0] is floats[0]
    assert list(task.state_dict()) == keys  # nothing of the normalisation is saved


def test_mixup_in_a_fit_sees_normalised_floats() -> None:
    recipe = Recipe.model_validate(
        {"data": {"builtin": "digits"}, "augment": {"mixup_alpha": 0.2, "cutmix_alpha": 1.0}}
    )
    task = _task(recipe)
    task.input_normalise = IntegerNormalise(MEAN3, STD3)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    loader = torch.utils.data.DataLoader(
        list(zip(images, torch.arange(8) % 2, strict=True)), batch_size=4
    )
    seen = []
    mix = task.mix

    def spy(batch: tuple) -> tuple:
        given = batch[0].clone()  # timm's Mixup mixes in place
        mixed = mix(batch)
        seen.append((given, mixed[0].dtype, mixed[2]))
        return mixed

    task.mix = spy
    trainer = L.Trainer(
        max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(task, train_dataloaders=loader)
    assert len(seen) == 2
    for k, (given, mixed_dtype, mixed) in enumerate(seen):
        assert mixed and mixed_dtype == torch.float32
        torch.testing.assert_close(given, task.input_normalise(images[4 * k : 4 * k + 4]))
