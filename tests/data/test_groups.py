"""Patient-level splits: a per-image split leaks patients, a grouped one does not."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest

from vittune.data.datamodule import scan_sources
from vittune.data.groups import write_splits
from vittune.errors import DataError, RecipeError
from vittune.recipe.schema import DataConfig


def _patients(root: Path, count: int = 24, views: int = 4) -> Path:
    """root/<class>/P<id>_<view>.png: each patient has `views` images and one class."""
    rng = np.random.default_rng(0)
    for patient in range(count):
        label = ("normal", "finding")[patient % 3 == 0]  # imbalanced: 1 in 3
        for view in range(views):
            folder = root / label
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 255, (8, 8), dtype=np.uint8)
            cv2.imwrite(str(folder / f"P{patient:03d}_{view}.png"), pixels)
    return root


def _paths(samples) -> set[Path]:
    return {s.path for s in samples}


def _written(path: Path, found) -> list[dict[str, str]]:
    """`found` through write_splits, read back as rows."""
    write_splits(path, found)
    with path.open() as handle:
        return list(csv.DictReader(handle))


def _same_split(a, b, splits=("train", "val")) -> bool:
    return all(_paths(a.splits[split]) == _paths(b.splits[split]) for split in splits)


def _groups(samples) -> set[str]:
    return {s.path.name.split("_")[0] for s in samples}


def test_per_image_split_leaks_and_grouped_split_does_not(tmp_path: Path) -> None:
    root = _patients(tmp_path / "data")
    leaky = scan_sources(DataConfig(root=str(root), val_fraction=0.25))
    assert _groups(leaky.splits["train"]) & _groups(leaky.splits["val"])  # the known failure
    cfg = DataConfig(root=str(root), val_fraction=0.25, group_pattern=r"(P\d+)_")
    found = scan_sources(cfg)
    train, val = found.splits["train"], found.splits["val"]
    assert not _groups(train) & _groups(val)
    assert {s.group for s in val} == _groups(val)  # the regex's group is the patient
    assert len(train) + len(val) == 96 and len(val) == 24  # 1 fold of 4: a quarter
    assert {s.labels[0] for s in val} == {0, 1}  # stratified: both classes held out
    again = scan_sources(cfg)
    assert [s.path for s in again.splits["val"]] == [s.path for s in val]  # seeded
    other = scan_sources(
        DataConfig(root=str(root), val_fraction=0.25, group_pattern=r"(P\d+)_", split_seed=5)
    )
    assert {s.path for s in other.splits["val"]} != {s.path for s in val}


def test_test_fraction_carves_three_disjoint_patient_sets(tmp_path: Path) -> None:
    root = _patients(tmp_path / "data", count=30)
    cfg = DataConfig(root=str(root), val_fraction=0.2, test_fraction=0.2, group_pattern=r"(P\d+)_")
    splits = scan_sources(cfg).splits
    groups = {name: _groups(samples) for name, samples in splits.items()}
    assert set(splits) == {"train", "val", "test"}
    assert not groups["train"] & groups["val"] and not groups["train"] & groups["test"]
    assert not groups["val"] & groups["test"]
    assert sum(len(g) for g in groups.values()) == 30
    plain = scan_sources(DataConfig(root=str(root), val_fraction=0.2, test_fraction=0.2)).splits
    assert {k: len(v) for k, v in plain.items()} == {"train": 72, "val": 24, "test": 24}


def test_csv_group_column_and_the_overlap_check(tmp_path: Path) -> None:
    root = _patients(tmp_path / "data", count=12, views=2)
    rows = []
    for image in sorted(root.rglob("*.png")):
        patient = image.name.split("_")[0]
        split = "val" if patient in ("P001", "P002") else "train"
        rows.append([image.relative_to(root).as_posix(), image.parent.name, split, patient])
    rows[0][2] = "val"  # P000's first view in val, its second in train: a leak
    rows[2][2] = "test"  # and P001's first view in test while its second is in val
    manifest = root / "labels.csv"
    with manifest.open("w", newline="") as handle:
        csv.writer(handle).writerows([["path", "label", "split", "patient"], *rows])
    cfg = DataConfig(csv=str(manifest), group_column="patient")
    with pytest.raises(DataError, match=r"2 group\(s\) appear in more than one split") as err:
        scan_sources(cfg)
    assert "'P000' in train and val" in str(err.value)
    allowed = scan_sources(
        DataConfig(csv=str(manifest), group_column="patient", allow_group_overlap=True)
    )
    assert {s.group for s in allowed.splits["val"]} >= {"P001", "P002"}
    with pytest.raises(DataError, match="needs a header with columns"):
        scan_sources(DataConfig(csv=str(manifest), group_column="study"))


def test_splits_csv_records_and_reproduces_a_split(tmp_path: Path) -> None:
    root = _patients(tmp_path / "data")
    found = scan_sources(DataConfig(root=str(root), group_pattern=r"(P\d+)_", val_fraction=0.25))
    rows = _written(tmp_path / "splits.csv", found)
    assert len(rows) == 96 and set(rows[0]) == {"path", "split", "labels", "group"}
    by_group: dict[str, set[str]] = {}
    for row in rows:
        by_group.setdefault(row["group"], set()).add(row["split"])
    assert all(len(s) == 1 for s in by_group.values())
    # another seed and a test fraction, but the splits file wins, exactly as written
    reused = scan_sources(
        DataConfig(
            root=str(root),
            split_seed=9,
            test_fraction=0.2,
            splits_from=str(tmp_path / "splits.csv"),
        )
    )
    assert set(reused.splits) == {"train", "val"}
    assert _same_split(reused, found)


def test_a_train_fraction_split_is_reused_exactly_and_can_be_subset_again(tmp_path: Path) -> None:
    root = _patients(tmp_path / "data")
    found = scan_sources(DataConfig(root=str(root), val_fraction=0.25, train_fraction=0.3))
    rows = _written(tmp_path / "splits.csv", found)
    unused = {Path(r["path"]) for r in rows if r["split"] == "unused"}
    assert len(rows) == 96 and len(unused) == 72 - len(found.splits["train"])  # every image
    # the same recipe with the file: the same subset, not a subset of the subset
    again = scan_sources(
        DataConfig(
            root=str(root),
            val_fraction=0.25,
            train_fraction=0.3,
            splits_from=str(tmp_path / "splits.csv"),
        )
    )
    assert _same_split(again, found)
    assert _paths(again.unused) == unused
    # the split of a full run, with a train fraction now: that split's train images, subset
    full = scan_sources(DataConfig(root=str(root), val_fraction=0.25))
    _written(tmp_path / "full.csv", full)
    subset = scan_sources(
        DataConfig(root=str(root), train_fraction=0.5, splits_from=str(tmp_path / "full.csv"))
    )
    assert _same_split(subset, full, ("val",))
    kept = _paths(subset.splits["train"])
    assert kept < _paths(full.splits["train"]) and len(kept) == 36


def test_bad_group_settings_are_one_line_errors(tmp_path: Path) -> None:
    root = _patients(tmp_path / "data", count=6)
    with pytest.raises(DataError, match="matches no group in 24 path"):
        scan_sources(DataConfig(root=str(root), group_pattern=r"(Q\d+)_"))
    with pytest.raises(RecipeError, match="one capture group"):
        scan_sources(DataConfig(root=str(root), group_pattern=r"P\d+_"))
    with pytest.raises(DataError, match="only 6 groups"):
        scan_sources(DataConfig(root=str(root), group_pattern=r"(P\d+)_", val_fraction=0.1))
