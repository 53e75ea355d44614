"""Which images `vittune predict` reads: files, folders, shell globs and CSV manifests.

The shell usually expands globs itself; a quoted glob (needed when the match list is longer
than the command line allows) reaches us unexpanded, so it is expanded here as well.
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable
from pathlib import Path

from vittune.data.decode import IMAGE_SUFFIXES, is_image_file
from vittune.errors import DataError

_SUFFIXES = ", ".join(IMAGE_SUFFIXES)


def _images_under(folder: Path) -> list[Path]:
    """Image files anywhere below `folder`, in sorted order so runs are repeatable."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))


def _from_manifest(manifest: Path) -> list[Path]:
    """Rows of a CSV with a `path` column; paths are relative to the CSV's folder."""
    with manifest.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
        reader = csv.DictReader(handle)
        if "path" not in (reader.fieldnames or []):
            raise DataError(
                f"{manifest} needs a header with a 'path' column; found {reader.fieldnames or []}"
            )
        rows = list(reader)
    if not rows:
        raise DataError(f"{manifest} lists no images; add rows under its 'path' column")
    paths = []
    for line, row in enumerate(rows, start=2):
        relative = (row["path"] or "").strip()
        image = manifest.parent / relative
        if not relative or not image.is_file():
            raise DataError(
                f"{manifest} line {line}: image {relative!r} not found (paths are relative to "
                "the CSV); fix or remove the row"
            )
        paths.append(image)
    return paths


def _from_glob(pattern: str) -> list[Path]:
    images = []
    for match in sorted(glob.glob(pattern, recursive=True)):
        path = Path(match)
        if path.is_dir():
            images += _images_under(path)
        elif is_image_file(path):
            images.append(path)
    if not images:
        raise DataError(f"no images ({_SUFFIXES}) match {pattern!r}; check the pattern")
    return images


def _expand(item: str | Path) -> list[Path]:
    path = Path(item)
    if path.is_dir():
        images = _images_under(path)
        if not images:
            raise DataError(f"no images ({_SUFFIXES}) under {path}; check the folder")
        return images
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return _from_manifest(path)
        if is_image_file(path):
            return [path]
        raise DataError(f"{path} is neither an image ({_SUFFIXES}) nor a CSV with a 'path' column")
    if glob.has_magic(str(item)):
        return _from_glob(str(item))
    raise DataError(f"{item} does not exist; give image files, folders, globs or a CSV")


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Image paths for INPUTS, in the order given, each file once.

    Folders are searched recursively, globs may use `**`, and a `.csv` is a manifest with a
    `path` column. Duplicates (the same file reached twice) keep their first position; two
    names for one file through a symlink count as two, since the user named both.

    Raises:
        DataError: an input does not exist, or a folder or glob holds no images.
    """
    seen, images = set(), []
    for item in inputs:
        for path in _expand(item):
            key = os.path.normcase(os.path.abspath(path))
            if key not in seen:
                seen.add(key)
                images.append(path)
    if not images:
        raise DataError("no inputs given; name image files, folders, globs or a CSV")
    return images
