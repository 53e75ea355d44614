"""`data.format: litdata`: shards written by prepare-data hold the splits, labels and pixels
that the same recipe reads from files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_images
from helpers import write_recipe

from vittune.data.datamodule import ImageDataModule, scan_sources
from vittune.data.decode import read_image
from vittune.data.prepare import prepare_data
from vittune.data.streaming import ItemDecoder, read_prepared
from vittune.errors import DataError, RecipeError
from vittune.recipe.load import load_recipe
from vittune.recipe.schema import AugmentConfig, DataConfig

MODEL = {"name": "vit_tiny_patch16_224", "img_size": 16, "patch_size": 8}


def truncate_pixel_data(path: Path) -> Path:
    """Keep the header, cut the compressed pixels: only decoding can tell."""
    path.write_bytes(path.read_bytes()[:-40])
    return path


def folder(root: Path) -> dict:
    make_class_images(root, {"a": 9, "b": 7, "c": 5}, size=16)
    (root / "b" / "notes.png").write_text("not an image")  # left out, in no split
    return {"root": str(root), "train_fraction": 0.8}


def folder_with_splits(root: Path) -> dict:
    for split, count in (("train", 6), ("val", 3), ("test", 2)):
        make_class_images(root / split, {"x": count, "y": count}, size=16, seed=count)
    truncate_pixel_data(root / "val" / "x" / "0001.png")  # its header passes: decoding fails
    return {"root": str(root)}


def multi_label_csv(root: Path) -> dict:
    make_class_images(root / "img", {"p": 6, "q": 6}, size=16, channels=3)
    labels = ["cat;dog", "dog", "cat", "bird;cat", "dog;bird", "cat"]
    with (root / "labels.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "split"])
        for i, image in enumerate(sorted((root / "img").rglob("*.png"))):
            split = "val" if i % 4 == 3 else "train"
            writer.writerow([image.relative_to(root), labels[i % len(labels)], split])
    return {"csv": str(root / "labels.csv"), "multi_label": True}


SOURCES = {"folder": folder, "splits": folder_with_splits, "multi_label_csv": multi_label_csv}


def prepared(tmp_path: Path, source: str) -> tuple[DataConfig, DataConfig, dict]:
    """(files config, litdata config, vittune.json) of a source written to shards."""
    data = {**SOURCES[source](tmp_path / "src"), "num_workers": 2, "batch_size": 4}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", {"data": data, "model": MODEL}))
    metadata = prepare_data(recipe, tmp_path / "out", log=lambda line: None)
    streamed = recipe.data.model_copy(
        update={"format": "litdata", "root": str(tmp_path / "out"), "csv": None}
    )
    return recipe.data, streamed, metadata


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_prepared_shards_hold_the_splits_labels_and_classes_of_scan_sources(
    tmp_path: Path, source: str
) -> None:
    files, streamed, metadata = prepared(tmp_path, source)
    expected, found = scan_sources(files), read_prepared(streamed)
    assert found.classes == expected.classes == metadata["classes"]
    assert {s: sorted((p.path, p.labels) for p in v) for s, v in found.splits.items()} == {
        s: sorted((p.path, p.labels) for p in v) for s, v in expected.splits.items()
    }
    # Training images are stored in a seeded random order, not class by class.
    labels = [s.labels[0] for s in found.splits["train"]]
    assert labels != sorted(labels)
    assert metadata["splits"] == {s: len(v) for s, v in expected.splits.items()}
    assert metadata["multi_label"] == files.multi_label and metadata["labelled"]
    assert found.refused == expected.refused  # the file no split holds is reported, not lost
    assert metadata["source"]["kind"] == ("csv" if files.csv else "folder")
    assert len(metadata["source"]["listing_sha256"]) == 64


@pytest.mark.parametrize("source", ["splits", "multi_label_csv"])
def test_streamed_items_decode_and_transform_as_files_do(tmp_path: Path, source: str) -> None:
    files, streamed, _ = prepared(tmp_path, source)
    chans = 3 if source == "multi_label_csv" else 1
    args = (AugmentConfig(preset="none"), 16, (0.5,) * chans, (0.25,) * chans, chans)
    from_files, from_shards = ImageDataModule(files, *args), ImageDataModule(streamed, *args)
    for split in from_files.found.splits:
        by_file, by_index = from_files.dataset(split), from_shards.dataset(split)
        at = {s.path: i for i, s in enumerate(by_file.samples)}  # file dataset index by path
        assert sorted(at) == sorted(s.path for s in by_index.samples)
        for i, sample in enumerate(by_index.samples):
            if source == "splits" and sample.path.name == "0001.png" and split == "val":
                continue  # the broken file: below
            image, target = by_index[i]
            torch.testing.assert_close(image, by_file[at[sample.path]][0], rtol=0, atol=0)
            assert torch.equal(target, by_file[at[sample.path]][1])
            pixels = ItemDecoder(None, len(from_shards.classes), chans)  # no transform
            raw = by_index._streams[split][by_index.places[i][1]]["image"]
            decoded = pixels(raw, str(sample.path), sample.labels)[0].permute(1, 2, 0)  # [H, W, C]
            np.testing.assert_array_equal(decoded.numpy(), read_image(sample.path, chans))
    # The training stream: every image once per epoch, each as its file gives it.
    # (preset none: the training transform only resizes, so files give the same tensors)
    stream = from_shards.dataset("train", train=True)
    by_file = from_files.dataset("train", train=True)
    at = {s.path: i for i, s in enumerate(by_file.samples)}
    shard_order = from_shards.found.splits["train"]
    decode = stream.transform
    stream.transform = lambda item: (json.loads(item["record"])["index"], decode(item))
    seen = []
    for index, (image, target) in stream:
        seen.append(index)
        expected = by_file[at[shard_order[index].path]]
        torch.testing.assert_close(image, expected[0], rtol=0, atol=0)
        assert torch.equal(target, expected[1])
    assert sorted(seen) == list(range(len(by_file)))


def test_a_corrupt_image_in_the_shards_is_handled_as_on_corrupt_says(tmp_path: Path) -> None:
    files, streamed, _ = prepared(tmp_path, "splits")
    args = (AugmentConfig(preset="none"), 16, (0.5,), (0.25,), 1)
    module = ImageDataModule(streamed, *args, run_dir=tmp_path)
    val = module.dataset("val")
    broken = [i for i, s in enumerate(val.samples) if s.path.name == "0001.png"]
    bad = val.samples[broken[0]].path
    with pytest.warns(UserWarning, match="left out of its batch"):
        assert val[broken[0]] is None
    batches = list(module.val_dataloader())  # SkipCorrupt leaves it out of its batch
    assert sum(len(targets) for _, targets in batches) == len(val) - 1
    report = module.corrupt_report()
    assert "1 failed to decode" in report and str(bad) in report
    strict = ImageDataModule(streamed.model_copy(update={"on_corrupt": "error"}), *args)
    with pytest.raises(DataError, match=f"cannot decode image {bad}"):
        strict.dataset("val")[broken[0]]


def test_litdata_recipes_are_checked_in_one_line(tmp_path: Path) -> None:
    base = {"data": {"root": str(tmp_path), "format": "litdata"}, "model": MODEL}
    recipe = write_recipe(tmp_path / "r.yaml", base)
    for override, expected in (
        ("data.cache=memory", "data.cache does not apply to data.format: litdata"),
        (
            f"data.csv={tmp_path / 'x.csv'}",
            "set exactly one of data.root, data.csv or data.builtin",
        ),
    ):
        with pytest.raises(RecipeError, match=expected):
            load_recipe(recipe, [override])
    with pytest.raises(RecipeError, match="reads shards from data.root, not data.builtin; run"):
        load_recipe(recipe, ["data.root=null", "data.builtin=digits"])
    cfg = load_recipe(recipe).data
    with pytest.raises(DataError, match=f"data.root {tmp_path} has no vittune.json; write it"):
        scan_sources(cfg)
    _, streamed, _ = prepared(tmp_path / "p", "folder")
    with pytest.raises(DataError, match="prepared with data.multi_label: False, the recipe"):
        read_prepared(streamed.model_copy(update={"multi_label": True}))
