"""Image folders and CSV manifests: layouts, stratified seeded splits, and the one-line errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_images
from helpers import held_out

from vittune.data.datamodule import ImageDataModule, scan_sources
from vittune.data.datasets import (
    Sample,
    scan_csv,
    scan_folder,
    stratified_split,
)
from vittune.errors import DataError
from vittune.recipe.schema import AugmentConfig, DataConfig


def data_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_flat_folder_gives_sorted_classes_and_every_image(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"zebra": 3, "ant": 2, "moth": 4}, size=8)
    (tmp_path / "d" / "ant" / "notes.txt").write_text("not an image")
    (tmp_path / "d" / ".cache").mkdir()  # hidden folders are not classes
    found = scan_folder(tmp_path / "d")
    assert found.classes == ["ant", "moth", "zebra"]
    assert list(found.splits) == ["train"]
    labels = Counter(s.labels[0] for s in found.splits["train"])
    assert labels == {0: 2, 1: 4, 2: 3}
    for sample in found.splits["train"]:
        assert sample.path.parent.name == found.classes[sample.labels[0]]


def test_split_folders_share_the_train_classes(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"a": 3, "b": 3}, size=8)
    make_class_images(tmp_path / "d" / "val", {"b": 2}, size=8)
    make_class_images(tmp_path / "d" / "test", {"a": 1, "b": 1}, size=8)
    found = scan_folder(tmp_path / "d")
    assert found.classes == ["a", "b"]
    assert {k: len(v) for k, v in found.splits.items()} == {"train": 6, "val": 2, "test": 2}
    assert all(s.labels == (1,) for s in found.splits["val"])  # "b" is class 1 of train, not 0


def test_folder_errors(tmp_path: Path) -> None:
    assert "does not exist" in data_error(scan_folder, tmp_path / "absent")
    make_class_images(tmp_path / "d", {"a": 2}, size=8)
    (tmp_path / "d" / "empty").mkdir()
    message = data_error(scan_folder, tmp_path / "d")
    assert "class folder" in message and "empty" in message and "has no images" in message
    make_class_images(tmp_path / "s" / "train", {"a": 2}, size=8)
    make_class_images(tmp_path / "s" / "val", {"a": 1, "ghost": 1}, size=8)
    assert "['ghost']" in data_error(scan_folder, tmp_path / "s")
    (tmp_path / "flat").mkdir()
    assert "no class sub-folders" in data_error(scan_folder, tmp_path / "flat")


def write_manifest(folder: Path, rows: list[str], header: str = "path,label,split") -> Path:
    path = folder / "manifest.csv"
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def test_csv_manifest_with_splits_and_relative_paths(tmp_path: Path) -> None:
    make_class_images(tmp_path / "img", {"cat": 3, "dog": 3}, size=8)
    rows = [f"img/cat/000{i}.png,cat,train" for i in range(2)]
    rows += [f"img/dog/000{i}.png,dog,train" for i in range(2)]
    rows += ["img/cat/0002.png,cat,val", "img/dog/0002.png,dog,TEST"]
    found = scan_csv(write_manifest(tmp_path, rows))
    assert found.classes == ["cat", "dog"]
    assert {k: len(v) for k, v in found.splits.items()} == {"train": 4, "val": 1, "test": 1}
    assert found.splits["test"][0] == Sample(tmp_path / "img/dog/0002.png", (1,))


def test_csv_without_split_column_and_with_a_byte_order_mark(tmp_path: Path) -> None:
    make_class_images(tmp_path / "img", {"cat": 2, "dog": 2}, size=8)
    rows = ["img/cat/0000.png,cat", "img/cat/0001.png,cat", "img/dog/0000.png,dog"]
    path = tmp_path / "excel.csv"
    path.write_bytes("\ufeffpath,label\n".encode() + "\n".join(rows).encode() + b"\n")
    found = scan_csv(path)
    assert found.classes == ["cat", "dog"] and len(found.splits["train"]) == 3


def test_csv_multi_label(tmp_path: Path) -> None:
    make_class_images(tmp_path / "img", {"x": 2}, size=8)
    rows = ["img/x/0000.png,fog;rain", "img/x/0001.png,sun"]
    found = scan_csv(write_manifest(tmp_path, rows, "path,label"), multi_label=True)
    assert found.classes == ["fog", "rain", "sun"]
    assert [s.labels for s in found.splits["train"]] == [(0, 1), (2,)]


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        (
            ["img/a/0000.png,a,train", "img/a/9999.png,a,train"],
            "line 3: image 'img/a/9999.png' not found",
        ),
        (
            ["img/a/0000.png,a,train", "img/b/0000.png,b,val"],
            "labels ['b'] in split 'val' never appear in train",
        ),
        (["img/a/0000.png,a,train", "img/a/0001.png,a,tset"], "split 'tset' must be one of"),
        (["img/a/0000.png,,train"], "line 2: empty label"),
        (["img/a/0000.png,a,val"], "no rows in the train split"),
        ([], "lists no images"),
    ],
)
def test_csv_errors_name_the_row_and_the_fix(
    tmp_path: Path, rows: list[str], expected: str
) -> None:
    make_class_images(tmp_path / "img", {"a": 2, "b": 1}, size=8)
    assert expected in data_error(scan_csv, write_manifest(tmp_path, rows))


def test_csv_header_and_path_errors(tmp_path: Path) -> None:
    assert "does not exist" in data_error(scan_csv, tmp_path / "absent.csv")
    path = write_manifest(tmp_path, ["x.png,a"], header="file,class")
    assert "needs a header with columns ['label', 'path']" in data_error(scan_csv, path)


def samples(counts: dict[int, int]) -> list[Sample]:
    return [Sample(Path(f"{c}/{i}.png"), (c,)) for c, n in counts.items() for i in range(n)]


def test_stratified_split_holds_out_each_class_in_proportion() -> None:
    counts = {0: 50, 1: 11, 2: 3, 3: 2, 4: 1}
    everything = samples(counts)
    train, val = stratified_split(everything, 0.2, seed=7)
    per_class = Counter(s.labels[0] for s in val)
    assert per_class == {c: held_out(n, 0.2) for c, n in counts.items() if held_out(n, 0.2)}
    assert per_class[0] == 10 and per_class[2] == 1 and 4 not in per_class
    assert {s.path for s in train} | {s.path for s in val} == {s.path for s in everything}
    assert not {s.path for s in train} & {s.path for s in val}
    assert Counter(s.labels[0] for s in train)[4] == 1  # a lone image stays in train


def test_stratified_split_is_seeded() -> None:
    everything = samples({0: 40, 1: 40})
    first = stratified_split(everything, 0.25, seed=3)[1]
    again = stratified_split(list(everything), 0.25, seed=3)[1]
    other = stratified_split(everything, 0.25, seed=4)[1]
    assert {s.path for s in first} == {s.path for s in again}
    assert {s.path for s in first} != {s.path for s in other}


def test_scan_sources_creates_a_validation_split_and_a_train_subset(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 20, "b": 10}, size=8)
    cfg = DataConfig(root=str(tmp_path / "d"), val_fraction=0.2, split_seed=1)
    found = scan_sources(cfg)
    assert Counter(s.labels[0] for s in found.splits["val"]) == {0: 4, 1: 2}
    subset = scan_sources(cfg.model_copy(update={"train_fraction": 0.5}))
    assert Counter(s.labels[0] for s in subset.splits["train"]) == {0: 8, 1: 4}
    assert {s.path for s in subset.splits["val"]} == {s.path for s in found.splits["val"]}
    assert {s.path for s in subset.splits["train"]} < {s.path for s in found.splits["train"]}


def test_a_train_subset_keeps_every_class(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d" / "train", {"a": 10, "rare": 1}, size=8)
    make_class_images(tmp_path / "d" / "val", {"a": 1, "rare": 1}, size=8)
    cfg = DataConfig(root=str(tmp_path / "d"), train_fraction=0.3)
    kept = Counter(s.labels[0] for s in scan_sources(cfg).splits["train"])
    assert kept == {0: 3, 1: 1}  # the rare class's one image is not dropped


def test_dataset_serves_normalised_tensors(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 3, "b": 3}, size=16, dtype=np.uint16)
    cfg = DataConfig(root=str(tmp_path / "d"), val_fraction=0.3, num_workers=0, batch_size=2)
    module = ImageDataModule(cfg, AugmentConfig(preset="none"), 8, (0.5,), (0.25,), in_chans=1)
    assert module.classes == ["a", "b"]
    assert module.class_counts().tolist() == [2.0, 2.0]
    train = module.dataset("train")
    for index in range(len(train)):
        image, target = train[index]
        assert image.shape == (1, 8, 8) and image.dtype == torch.float32
        assert target.item() in (0, 1)
    batch, targets = next(iter(module.train_dataloader()))
    assert batch.shape == (2, 1, 8, 8) and targets.dtype == torch.int64
    with pytest.raises(DataError, match="no 'test' split"):
        module.test_dataloader()
