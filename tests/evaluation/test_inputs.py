"""INPUTS expansion on a generated folder tree: files, folders, globs, CSV manifests, errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image

from vittune.errors import DataError
from vittune.evaluation.inputs import expand_inputs


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """root/a/1.png, root/a/deep/2.JPG, root/b/3.tif, root/b/notes.txt, root/empty/"""
    pixels = np.zeros((8, 8), dtype=np.uint8)
    for name in ("a/1.png", "a/deep/2.JPG", "b/3.tif"):
        write_image(tmp_path / "root" / name, pixels)
    (tmp_path / "root" / "b" / "notes.txt").write_text("not an image")
    (tmp_path / "root" / "empty").mkdir()
    return tmp_path / "root"


def names(paths: list[Path], root: Path) -> list[str]:
    return [p.resolve().relative_to(root.resolve()).as_posix() for p in paths]


def test_folders_are_searched_recursively_in_sorted_order(tree: Path) -> None:
    assert names(expand_inputs([tree]), tree) == ["a/1.png", "a/deep/2.JPG", "b/3.tif"]


def test_order_is_kept_and_duplicates_dropped(tree: Path, monkeypatch) -> None:
    monkeypatch.chdir(tree)
    paths = expand_inputs(["b/3.tif", "a", str(tree / "b" / "3.tif"), "./a/1.png"])
    assert names(paths, tree) == ["b/3.tif", "a/1.png", "a/deep/2.JPG"]
    assert paths[0] == Path("b/3.tif")  # as the user wrote it


def test_globs_including_recursive_ones(tree: Path) -> None:
    assert names(expand_inputs([str(tree / "*" / "*.png")]), tree) == ["a/1.png"]
    matched = expand_inputs([str(tree / "**" / "*.*")])  # notes.txt is left out
    assert names(matched, tree) == ["a/1.png", "a/deep/2.JPG", "b/3.tif"]
    assert names(expand_inputs([str(tree / "[ab]")]), tree) == names(expand_inputs([tree]), tree)


def test_csv_paths_are_relative_to_the_csv(tree: Path, tmp_path: Path) -> None:
    manifest = tree / "a" / "list.csv"
    manifest.write_text("path,comment\ndeep/2.JPG,x\n../b/3.tif,y\n1.png,z\ndeep/2.JPG,again\n")
    assert names(expand_inputs([manifest]), tree) == ["a/deep/2.JPG", "b/3.tif", "a/1.png"]
    excel = tmp_path / "excel.csv"
    excel.write_text("path\nroot/a/1.png\n", encoding="utf-8-sig")  # with a BOM
    assert names(expand_inputs([excel]), tree) == ["a/1.png"]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: [root / "missing.png"], "does not exist"),
        (lambda root: [str(root / "*.jpeg")], "no images .* match"),
        (lambda root: [root / "empty"], "no images .* under"),
        (lambda root: [root / "b" / "notes.txt"], "neither an image"),
        (lambda root: [], "no inputs given"),
    ],
)
def test_bad_inputs_give_one_line_errors(tree: Path, make, message: str) -> None:
    with pytest.raises(DataError, match=message) as error:
        expand_inputs(make(tree))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("file\n1.png\n", "needs a header with a 'path' column"),
        ("path\n", "lists no images"),
        ("path\n1.png\nnope.png\n", "line 3: image 'nope.png' not found"),
    ],
)
def test_bad_manifests(tree: Path, text: str, message: str) -> None:
    manifest = tree / "a" / "bad.csv"
    manifest.write_text(text)
    with pytest.raises(DataError, match=message):
        expand_inputs([manifest])


def test_a_file_whose_name_looks_like_a_glob_is_taken_as_a_file(tree: Path) -> None:
    odd = tree / "a" / "scan[1].png"
    os.link(tree / "a" / "1.png", odd)
    assert expand_inputs([odd]) == [odd]
