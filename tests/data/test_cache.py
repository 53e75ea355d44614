"""data.cache: decoded pixels kept in memory or on disk give the batches of decoding every time."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_images
from torch.utils.data import DataLoader

import vittune.data.cache as cache_module
from vittune.data.cache import build_memory_cache
from vittune.data.datamodule import ImageDataModule
from vittune.data.datasets import SkipCorrupt
from vittune.errors import DataError
from vittune.recipe.schema import AugmentConfig, DataConfig


def folder(root: Path) -> Path:
    make_class_images(root / "train", {"a": 6, "b": 5}, size=20, dtype=np.uint16)
    make_class_images(root / "val", {"a": 2, "b": 2}, size=20, seed=1)
    return root


def module(root: Path, cache: str, tmp_path: Path, workers: int = 0, **data) -> ImageDataModule:
    cfg = DataConfig(
        root=str(root), batch_size=4, num_workers=workers, cache=cache,
        cache_dir=str(tmp_path / "decoded"), **data,
    )  # fmt: skip
    return ImageDataModule(cfg, AugmentConfig(preset="light"), 16, (0.5,), (0.25,), in_chans=1)


def epochs(data: ImageDataModule, count: int = 2) -> list[torch.Tensor]:
    torch.manual_seed(3)  # the loaders' seeds (and so the augmentation) come from here
    loaders = [data.train_dataloader(), data.val_dataloader()]
    return [torch.cat([images for images, _ in loader]) for _ in range(count) for loader in loaders]


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    decoded: list[Path] = []
    real = cache_module.read_raw

    def counting(path, *args, **kwargs):
        decoded.append(Path(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "read_raw", counting)
    return decoded


@pytest.mark.parametrize(("cache", "workers"), [("memory", 0), ("disk", 0), ("memory", 2)])
def test_cached_loaders_give_the_batches_of_uncached_ones(
    tmp_path: Path, cache: str, workers: int
) -> None:
    root = folder(tmp_path / "d")
    expected = epochs(module(root, "none", tmp_path, workers))
    for got, want in zip(epochs(module(root, cache, tmp_path, workers)), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_disk_cache_is_reused_and_rebuilt_when_a_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = folder(tmp_path / "d")
    decoded = count_decodes(monkeypatch)
    first = module(root, "disk", tmp_path)
    first.setup("fit")
    assert len(decoded) == 15  # 11 train + 4 val, each once
    files = sorted((tmp_path / "decoded").glob("*.vtcache"))
    assert len(files) == 2 and not list((tmp_path / "decoded").glob("*.partial"))
    stamps = [f.stat().st_mtime_ns for f in files]
    expected = epochs(first)

    decoded.clear()
    again = module(root, "disk", tmp_path)  # a second run
    again.setup("fit")
    assert decoded == [] and [f.stat().st_mtime_ns for f in files] == stamps
    for got, want in zip(epochs(again), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)

    changed = sorted((root / "val" / "a").iterdir())[0]
    make_class_images(tmp_path / "other", {"a": 1}, size=20, seed=9)
    os.replace(next((tmp_path / "other" / "a").iterdir()), changed)
    third = module(root, "disk", tmp_path)
    third.setup("fit")
    assert decoded == [p.path for p in third.found.splits["val"]]  # only val is decoded again


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_pixel_bytes(path: Path) -> None:
    """A run of pixel bytes zeroed in place; the index and the footer stay intact."""
    with path.open("r+b") as handle:
        handle.seek(100)
        handle.write(bytes(500))


@pytest.mark.parametrize(
    ("damage", "warning"),
    [
        (_truncate, "incomplete or damaged; rebuilding it"),
        (_zero_pixel_bytes, "an image's checksum did not match"),
    ],
    ids=["truncated", "zeroed-pixels"],
)
def test_a_damaged_cache_file_is_detected_and_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage, warning: str
) -> None:
    root = folder(tmp_path / "d")
    first = module(root, "disk", tmp_path)
    first.setup("fit")
    expected = epochs(first)
    for damaged in (tmp_path / "decoded").glob("*.vtcache"):
        damage(damaged)
    decoded = count_decodes(monkeypatch)
    again = module(root, "disk", tmp_path)
    with pytest.warns(UserWarning, match=warning):
        again.setup("fit")
    assert len(decoded) == 15  # decoded again, not trusted
    for got, want in zip(epochs(again), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_a_file_that_fails_to_decode_is_still_left_out_and_reported(
    tmp_path: Path, cache: str
) -> None:
    root = folder(tmp_path / "d")
    broken = sorted((root / "val" / "b").iterdir())[1]
    broken.write_bytes(broken.read_bytes()[:-40])  # the header passes, the pixels do not
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    data = module(root, cache, tmp_path)
    data.run_dir, data.corrupt_log.path = run_dir, run_dir / ".corrupt_decode.log"
    data.setup("fit")
    with pytest.warns(UserWarning, match="left out of its batch"):
        served = sum(len(labels) for _, labels in data.val_dataloader())
    assert served == 3  # of 4
    report = data.corrupt_report()
    assert report is not None and "1 failed to decode" in report
    assert str(broken) in (run_dir / "corrupt_files.txt").read_text()


def test_memory_refuses_what_would_not_fit_and_names_disk(tmp_path: Path) -> None:
    root = folder(tmp_path / "d")
    paths = sorted((root / "train" / "a").iterdir())
    with pytest.raises(DataError, match=r"more than .* of available memory.*use data.cache: disk"):
        build_memory_cache(paths, None, ram_share=1e-12)


def test_spawned_workers_read_the_shared_memory_cache(tmp_path: Path) -> None:
    data = module(folder(tmp_path / "d"), "memory", tmp_path)
    assert data.dataset("val").cache is None  # evaluate/export read once: no fill pass
    data.cache("val")
    dataset = data.dataset("val")  # evaluation transform: no randomness
    assert dataset.cache is not None and dataset.cache.buffer.is_shared()
    loader = DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn",
                        collate_fn=SkipCorrupt())  # fmt: skip
    ((images, _),) = list(loader)
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
