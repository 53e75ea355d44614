"""Bundled demo data: scikit-learn's digits, exported once to an image folder in a cache."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np


def cache_dir() -> Path:
    """`$VITTUNE_CACHE`, else `$XDG_CACHE_HOME/vittune`, else `~/.cache/vittune`."""
    if os.environ.get("VITTUNE_CACHE"):
        return Path(os.environ["VITTUNE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vittune"


def export_digits(target: Path | None = None) -> Path:
    """Write the 1,797 8x8 digits as 8-bit PNGs in `<target>/<digit>/<index>.png`.

    The export is written to a temporary folder and renamed into place, so an interrupted
    run never leaves a half-written dataset behind.
    """
    target = target or cache_dir() / "digits"
    if (target / ".complete").exists():
        return target
    from sklearn.datasets import load_digits  # only the demo needs scikit-learn

    digits = load_digits()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".digits-", dir=target.parent))
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        folder = staging / str(label)
        folder.mkdir(exist_ok=True)
        image = np.round(pixels * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
        cv2.imwrite(str(folder / f"{index:04d}.png"), image)
    (staging / ".complete").touch()
    if target.exists():
        shutil.rmtree(target)
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


BUILTIN = {"digits": export_digits}
