"""Data that arrives broken or silently wrong: zero-byte images, the same image listed twice
or in two splits, symlinked class folders and symlink loops. Each is caused for real (real
empty files, real symlinks, real CSVs) and ends in one line or a de-duplicated split."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import make_class_images

from vittune.data.datamodule import scan_sources
from vittune.data.decode import check_image, read_image
from vittune.errors import DataError
from vittune.recipe.schema import DataConfig


def test_a_zero_byte_image_is_one_line_and_left_out_or_refused(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 6, "b": 6}, size=16)
    empty = tmp_path / "d" / "a" / "empty.png"
    empty.write_bytes(b"")
    for read in (read_image, check_image):
        with pytest.raises(DataError) as info:
            read(empty)
        assert str(info.value) == (
            f"cannot decode image {empty}: the file is empty (0 bytes); replace or remove it"
        )
    found = scan_sources(DataConfig(root=str(tmp_path / "d"), val_fraction=0.25))
    assert list(found.refused) == [empty]  # on_corrupt: skip (the default) leaves it out
    assert sum(len(v) for v in found.splits.values()) == 12
    strict = DataConfig(root=str(tmp_path / "d"), val_fraction=0.25, on_corrupt="error")
    with pytest.raises(DataError, match=r"empty \(0 bytes\).*data.on_corrupt: error"):
        scan_sources(strict)


def test_a_class_of_unreadable_files_only_is_refused_not_trained_empty(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 6, "b": 6}, size=16)
    (tmp_path / "d" / "c").mkdir()
    (tmp_path / "d" / "c" / "corrupt.png").write_bytes(b"not a png at all")
    with pytest.raises(DataError, match=r"class 'c' has no readable image \(e.g. cannot decode"):
        scan_sources(DataConfig(root=str(tmp_path / "d"), val_fraction=0.25))
    (tmp_path / "d" / "c" / "fine.png").write_bytes(
        (tmp_path / "d" / "a" / "0000.png").read_bytes()
    )
    found = scan_sources(DataConfig(root=str(tmp_path / "d"), val_fraction=0.25))
    assert found.classes == ["a", "b", "c"] and len(found.refused) == 1  # one good file: kept


def write_csv(path: Path, rows: list[str]) -> Path:
    path.write_text("path,label,split\n" + "\n".join(rows) + "\n")
    return path


def test_an_image_listed_twice_or_in_two_splits_is_refused_or_kept_once(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 4, "b": 4}, size=16)
    rows = [f"d/{c}/{i:04d}.png,{c},{'val' if i == 3 else 'train'}" for c in "ab" for i in range(4)]
    twice = rows + ["d/a/0000.png,a,train"]  # the same row again
    leaked = rows + ["./d/b/0000.png,b,val"]  # a training image also in val, spelled otherwise
    for extra, shown in ((twice, "(train/a) is"), (leaked, "(train/b)")):
        csv = write_csv(tmp_path / "m.csv", extra)
        with pytest.raises(DataError) as info:
            scan_sources(DataConfig(csv=str(csv)))
        message = str(info.value)
        assert message.startswith("the data lists the same image more than once: ")
        assert shown in message and "data.allow_duplicates: true" in message
    csv = write_csv(tmp_path / "m.csv", leaked)
    with pytest.warns(UserWarning, match="1 repeated images kept once"):
        found = scan_sources(DataConfig(csv=str(csv), allow_duplicates=True))
    train = {s.path.resolve() for s in found.splits["train"]}
    val = {s.path.resolve() for s in found.splits["val"]}
    assert not train & val and len(val) == 3 and len(train) == 5  # val keeps its copy
    assert (tmp_path / "d" / "b" / "0000.png").resolve() in val


def test_a_class_folder_linked_to_the_root_is_refused(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 4, "b": 4}, size=16)
    (tmp_path / "d" / "zz").symlink_to(".")  # every image again, as a class "zz"
    with pytest.raises(DataError, match=r"d/zz/a/0000.png \(train/zz\) is .*d/a/0000.png"):
        scan_sources(DataConfig(root=str(tmp_path / "d")))
    with pytest.raises(DataError, match=r"classes \[.zz.\] hold only"):
        scan_sources(DataConfig(root=str(tmp_path / "d"), allow_duplicates=True))


def test_a_symlink_loop_ends_and_a_linked_class_folder_elsewhere_is_fine(tmp_path: Path) -> None:
    make_class_images(tmp_path / "d", {"a": 4}, size=16)
    make_class_images(tmp_path / "elsewhere", {"b": 4}, size=16, seed=3)
    (tmp_path / "d" / "a" / "loop").symlink_to("..")  # a loop under a class folder
    (tmp_path / "d" / "b").symlink_to(tmp_path / "elsewhere" / "b")  # a real class, linked
    found = scan_sources(DataConfig(root=str(tmp_path / "d"), val_fraction=0.25))
    assert found.classes == ["a", "b"]
    assert sum(len(v) for v in found.splits.values()) == 8  # each image once
