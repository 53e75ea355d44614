"""Image decoding that keeps the dynamic range of medical images.

OpenCV is used (not PIL) because it reads 16-bit PNG and TIFF, grey and colour,
without converting them to 8 bits; PIL silently drops 16-bit RGB to 8 bits.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from vittune.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")

# ITU-R BT.601 luma weights, the same that PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def scale_intensity(pixels: np.ndarray, mode: str = "dtype") -> np.ndarray:
    """Map raw pixel values to float32 in [0, 1].

    `dtype` divides by the integer type's maximum (a 12-bit image stored in 16 bits stays
    dim but keeps every level); `minmax` stretches each image to its own range.
    """
    if mode == "minmax":
        pixels = pixels.astype(np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    if np.issubdtype(pixels.dtype, np.integer):
        # Signed data (CT slices in Hounsfield units, int16) maps its whole range, so negative
        # values land in [0, 1] too; 32-bit types are scaled in float64 to keep their levels.
        info = np.iinfo(pixels.dtype)
        wide = np.float64 if pixels.dtype.itemsize > 2 else np.float32
        scaled = (pixels.astype(wide) - info.min) / (float(info.max) - float(info.min))
        return scaled.astype(np.float32)
    pixels = pixels.astype(np.float32)
    high = float(pixels.max()) if pixels.size else 1.0
    return np.clip(pixels / high, 0.0, 1.0) if high > 1.0 else np.clip(pixels, 0.0, 1.0)


def match_channels(pixels: np.ndarray, in_chans: int) -> np.ndarray:
    """Convert an [H, W] or [H, W, C] RGB(A) image to [H, W, in_chans]."""
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    channels = pixels.shape[2]
    if channels == 4 and in_chans != 4:
        pixels, channels = pixels[:, :, :3], 3  # drop alpha
    if channels == in_chans:
        return pixels
    if channels == 1:
        return np.repeat(pixels, in_chans, axis=2)
    if channels == 3 and in_chans == 1:
        return (pixels @ _LUMA)[:, :, None]
    raise DataError(
        f"image has {channels} channels but model.in_chans is {in_chans}; set model.in_chans to {channels}"
    )


def read_image(path: str | Path, in_chans: int = 3, intensity: str = "dtype") -> np.ndarray:
    """Decode any PNG/JPEG/TIFF/BMP (8 or 16 bit, grey, RGB, RGBA, palette) to float32 [H, W, C]."""
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None or pixels.size == 0:
        raise DataError(
            f"cannot decode image {path}: the file is corrupt or not an image; replace or remove it"
        )
    if pixels.ndim == 3 and pixels.shape[2] >= 3:
        order = [2, 1, 0, 3] if pixels.shape[2] == 4 else [2, 1, 0]
        pixels = pixels[:, :, order]  # OpenCV decodes to BGR(A)
    pixels = scale_intensity(pixels, intensity)
    return np.ascontiguousarray(match_channels(pixels, in_chans), dtype=np.float32)
