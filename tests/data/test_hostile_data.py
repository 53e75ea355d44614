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
