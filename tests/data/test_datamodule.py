"""The data module's loaders: seeded augmentation per worker and epoch, and corrupt files left
out (before the split when the header is unreadable, from the batch when decoding fails)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_images, write_image
from helpers import write_png

from vittune.data.datamodule import ImageDataModule, scan_sources
from vittune.data.datasets import ImageDataset, SkipCorrupt
from vittune.errors import DataError
from vittune.recipe.schema import AugmentConfig, DataConfig


def one_picture_many_times(root: Path, count: int) -> Path:
    """`count` identical files: whatever differs between the served images is augmentation."""
    pixels = np.random.default_rng(0).integers(0, 256, (24, 24), dtype=np.uint8)
    for k in range(count):
        write_image(root / f"{k:03d}.png", pixels)
    return root


def augmented_epochs(root: Path, workers: int, epochs: int = 2) -> list[torch.Tensor]:
    cfg = DataConfig(
        root=str(root), labelled=False, val_fraction=0.1, batch_size=4, num_workers=workers
    )
    module = ImageDataModule(cfg, AugmentConfig(preset="light"), 16, (0.5,), (0.25,), in_chans=1)
    loader = module.train_dataloader()  # persistent workers when workers > 0
    return [torch.cat([images for images, _ in loader]) for _ in range(epochs)]


@pytest.mark.parametrize("workers", [0, 2])
def test_augmentation_follows_the_torch_seed_and_differs_per_worker_and_epoch(
    tmp_path: Path, workers: int
) -> None:
    root = one_picture_many_times(tmp_path / "same", 18)  # 16 train, 2 val
    torch.manual_seed(7)  # what seed_everything(trainer.seed) does before the loaders are made
    first = augmented_epochs(root, workers)
    torch.manual_seed(7)
    again = augmented_epochs(root, workers)
    for epoch, repeat in zip(first, again, strict=True):
        torch.testing.assert_close(epoch, repeat, rtol=0, atol=0)
    # 2 epochs x 16 images, one picture: no two of the 32 crops/flips are the same, so workers
    # do not repeat each other and an epoch does not repeat the one before.
    served = torch.cat(first).flatten(1).float()  # [32, 16 * 16]; uint8 as the workers send it
    assert served.shape[0] == 32
    distance = torch.cdist(served, served) + torch.eye(32) * 1e6
    assert distance.min() > 1e-3
    torch.manual_seed(8)
    assert not torch.equal(augmented_epochs(root, workers, epochs=1)[0], first[0])


def corrupt_folder(root: Path) -> dict[str, Path]:
    """Two classes of readable images plus files that no header check lets through."""
    make_class_images(root, {"a": 10, "b": 10}, size=16)
    bad = {
        "text": root / "a" / "notes.png",
        "cut": root / "a" / "cut.png",
        "large": root / "b" / "large.png",
    }
    bad["text"].write_text("not an image")
    bad["cut"].write_bytes((root / "a" / "0000.png").read_bytes()[:20])  # header cut short
    write_png(bad["large"], np.zeros((40, 40), dtype=np.uint8))  # over max_image_pixels below
    return bad


def relative(found, root: Path) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    return {
        split: [(str(s.path.relative_to(root)), s.labels) for s in samples]
        for split, samples in found.splits.items()
    }


def test_unreadable_files_are_in_no_split_and_do_not_change_it(tmp_path: Path) -> None:
    bad = corrupt_folder(tmp_path / "data")
    clean = tmp_path / "clean"
    shutil.copytree(tmp_path / "data", clean)
    for path in bad.values():
        (clean / path.relative_to(tmp_path / "data")).unlink()
    cfg = DataConfig(root=str(tmp_path / "data"), val_fraction=0.2, max_image_pixels=1000)
    found = scan_sources(cfg)
    # The split is made after they are left out: exactly the split of the folder without them.
    assert relative(found, tmp_path / "data") == relative(
        scan_sources(cfg.model_copy(update={"root": str(clean)})), clean
    )
    assert {len(v) for v in found.splits.values()} == {16, 4}  # 20 readable images, 3 left out
    assert set(found.refused) == set(bad.values())
    assert "corrupt or not an image" in found.refused[bad["text"]]
    assert "40 x 40 pixels" in found.refused[bad["large"]]
    strict = cfg.model_copy(update={"on_corrupt": "error"})
    with pytest.raises(DataError) as info:
        scan_sources(strict)
    assert str(info.value) == (
        f"cannot decode image {bad['cut']}: the file is corrupt or not an image; replace or "
        "remove it (data.on_corrupt: error)"
    )


def test_a_split_with_no_readable_image_is_an_error(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"a": 3, "b": 3}, size=8)
    (tmp_path / "d" / "val" / "a").mkdir(parents=True)
    (tmp_path / "d" / "val" / "a" / "x.png").write_bytes(b"\x89PNG")
    with pytest.raises(DataError, match=r"no image of the val split can be read; the first: "):
        scan_sources(DataConfig(root=str(tmp_path / "d")))


def truncate_pixel_data(path: Path) -> Path:
    """Keep the header, cut the compressed pixels: only decoding can tell."""
    path.write_bytes(path.read_bytes()[:-40])
    return path


def test_files_that_fail_to_decode_leave_their_batch_and_are_reported(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"a": 4, "b": 4}, size=16, dtype=np.uint16)
    make_class_images(tmp_path / "d" / "val", {"a": 3, "b": 2}, size=16, dtype=np.uint16)
    broken = [
        truncate_pixel_data(tmp_path / "d" / "train" / "b" / "0001.png"),
        truncate_pixel_data(tmp_path / "d" / "val" / "a" / "0002.png"),
    ]
    cfg = DataConfig(root=str(tmp_path / "d"), batch_size=4, num_workers=2)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    module = ImageDataModule(
        cfg, AugmentConfig(preset="none"), 16, (0.0,), (1.0,), in_chans=1, run_dir=run_dir
    )
    assert module.found.refused == {}  # their headers are fine: they stay in the splits
    train = module.train_dataloader()
    for _ in range(2):  # persistent workers meet the broken file once per epoch
        sizes = [len(images) for images, _ in train]
        assert sorted(sizes) == [3, 4]  # 8 images, one dropped, nothing copied in its place
    served = torch.cat([images for images, _ in module.val_dataloader()]).flatten(1)
    expected = [
        module.eval_transform(image=module.dataset("val").load(i))["image"].flatten()
        for i, s in enumerate(module.found.splits["val"])
        if s.path != broken[1]
    ]
    torch.testing.assert_close(served, torch.stack(expected))  # the 4 others, each once
    report = module.corrupt_report()
    assert report.startswith("  corrupt files: 2 left out (0 unreadable at setup")
    assert "2 failed to decode, dropped from their batches" in report
    listing = (run_dir / "corrupt_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listing] == sorted(str(p) for p in broken)
    assert all("corrupt or not an image" in line for line in listing)


def test_no_report_when_every_file_was_read(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 3, "b": 3}, size=8)
    cfg = DataConfig(root=str(tmp_path / "d"), batch_size=2, num_workers=0)
    module = ImageDataModule(
        cfg, AugmentConfig(preset="none"), 8, (0.0,), (1.0,), 1, run_dir=tmp_path
    )
    for _ in module.train_dataloader():
        pass
    assert module.corrupt_report() is None and not (tmp_path / "corrupt_files.txt").exists()


def test_on_corrupt_error_stops_at_a_file_that_fails_to_decode(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 2}, size=8)
    broken = truncate_pixel_data(tmp_path / "d" / "a" / "0001.png")
    strict = ImageDataset(
        [s for s in scan_sources(DataConfig(root=str(tmp_path / "d"))).splits["train"]],
        num_classes=1,
        transform=None,
        in_chans=1,
        on_corrupt="error",
    )
    index = [s.path for s in strict.samples].index(broken)
    with pytest.raises(DataError, match=f"cannot decode image {broken}"):
        strict[index]
    assert ImageDataset(strict.samples, 1, None, in_chans=1)[index] is None  # skip: a marker


def test_skip_corrupt_keeps_mixup_batches_even_and_refuses_an_empty_batch() -> None:
    item = (torch.zeros(1, 2, 2), torch.tensor(0))
    images, targets = SkipCorrupt(even=True)([item, None, item, item])
    assert images.shape == (2, 1, 2, 2) and targets.tolist() == [0, 0]
    assert len(SkipCorrupt()([item, None, item])[0]) == 2
    with pytest.raises(DataError) as info:
        SkipCorrupt()([None, None])
    assert str(info.value).startswith("none of the 2 images of a batch could be decoded")
