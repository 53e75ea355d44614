"""The decompression-bomb guard every image reader applies to the size its header declares."""

from __future__ import annotations

from pathlib import Path

from vittune.errors import DataError


def check_pixel_count(path: str | Path, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse images larger than `data.max_image_pixels` (decompression bombs)."""
    if max_pixels and width * height > max_pixels:
        raise DataError(
            f"{path} declares {width} x {height} pixels ({width * height / 1e6:.0f} MP), more than "
            f"data.max_image_pixels ({max_pixels:,}); a decompression bomb or a genuine large image: "
            "raise data.max_image_pixels (null turns the limit off) if you trust the file"
        )
