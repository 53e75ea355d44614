"""Image decoding that keeps the dynamic range of medical images.

OpenCV is used (not PIL) because it reads 16-bit PNG and TIFF, grey and colour,
without converting them to 8 bits; PIL silently drops 16-bit RGB to 8 bits. Baseline and
progressive JPEGs (grey or colour) go to simplejpeg when it is installed: the same
libjpeg-turbo, the same pixels, with less overhead per call (docs/performance.md).

Two steps, so that training can work on the integers: `read_raw` gives the pixels as decoded
(uint8, uint16, int16, float...; RGB order), `to_float` scales them to float32 [0, 1] and
matches the model's channels. `read_image` is both.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from vittune.data.dicom import (
    DICOM_SUFFIXES,
    DicomOptions,
    check_dicom,
    is_dicom_file,
    looks_like_dicom,
    read_dicom,
)
from vittune.data.pixel_limit import check_pixel_count
from vittune.errors import DataError
from vittune.recipe.schema import DEFAULT_MAX_IMAGE_PIXELS

try:
    import simplejpeg
except ImportError:  # optional: OpenCV decodes every JPEG then
    simplejpeg = None

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", *DICOM_SUFFIXES)
# PIL's readers for the formats of IMAGE_SUFFIXES (found by content, as OpenCV does).
_HEADER_READERS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP")

# ITU-R BT.601 luma weights, the same that PIL's convert("L") uses.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def is_image_file(path: Path) -> bool:
    """An image by its suffix, or an extension-less DICOM file (PACS exports name files by
    UID), found by its preamble."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return not path.suffix and path.is_file() and is_dicom_file(path)


def intensity_range(pixels: np.ndarray, mode: str = "dtype") -> tuple[float, float] | None:
    """The raw values that `scale_intensity` maps to 0 and 1 for an integer image (None for
    float images, which are scaled by their own maximum).

    Computed on the whole image, so an image cropped later is still scaled as a whole.
    """
    if mode == "minmax":
        if pixels.size == 0:
            return 0.0, 0.0
        return float(pixels.min()), float(pixels.max())
    if np.issubdtype(pixels.dtype, np.integer):
        # Signed data (CT slices in Hounsfield units, int16) maps its whole range, so negative
        # values land in [0, 1] too.
        info = np.iinfo(pixels.dtype)
        return float(info.min), float(info.max)
    return None


def scale_to_range(pixels: np.ndarray, low: float, high: float) -> np.ndarray:
    """float32 (pixels - low) / (high - low); zeros where the range is empty."""
    if high <= low:
        return np.zeros(pixels.shape, np.float32)
    # 32-bit integers are scaled in float64 to keep their levels.
    wide = np.float64 if pixels.dtype.kind in "iu" and pixels.dtype.itemsize > 2 else np.float32
    scaled = (pixels.astype(wide) - low) / (high - low)
    return scaled.astype(np.float32, copy=False)


def scale_intensity(pixels: np.ndarray, mode: str = "dtype") -> np.ndarray:
    """Map raw pixel values to float32 in [0, 1].

    `dtype` divides by the integer type's maximum (a 12-bit image stored in 16 bits stays
    dim but keeps every level); `minmax` stretches each image to its own range.
    """
    span = intensity_range(pixels, mode)
    if span is not None:
        return scale_to_range(pixels, *span)
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


def image_size(source: str | Path | bytes) -> tuple[int, int] | None:
    """(width, height) as the header of a file (or of its bytes) declares it, read without
    decoding a pixel.

    None when PIL cannot parse the header (see `image_header`).
    """
    header = image_header(source)
    return None if header is None else header[0]


def image_header(source: str | Path | bytes) -> tuple[tuple[int, int], str] | None:
    """((width, height), PIL mode) as the header of a file (or of its bytes) declares them.

    None when PIL cannot parse the header: not an image, a truncated header, or one of the
    few formats OpenCV decodes and PIL does not (float RGB and float64 TIFFs).
    """
    # PIL reads headers lazily, but `Image.open` also applies PIL's own process-wide pixel
    # limit (`Image.MAX_IMAGE_PIXELS`), which would override `data.max_image_pixels`; so the
    # registered format readers are called directly, as `Image.open` does, minus that check.
    Image.init()
    in_memory = isinstance(source, bytes | bytearray | memoryview)
    name = "<bytes>" if in_memory else str(source)
    with io.BytesIO(source) if in_memory else open(source, "rb") as handle:
        prefix = handle.read(16)
        for reader in _HEADER_READERS:
            factory, accept = Image.OPEN.get(reader, (None, None))
            if factory is None or (accept is not None and accept(prefix) is not True):
                continue
            handle.seek(0)
            try:
                image = factory(handle, name)
                return image.size, image.mode
            except (SyntaxError, OSError, ValueError, IndexError, TypeError, struct.error):
                continue  # not this format (or a broken header): try the next reader
    return None


_JPEG_START = b"\xff\xd8\xff"  # a JPEG file's first bytes (SOI marker, then a segment)


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG from its frame header via simplejpeg (a tenth of PIL's
    cost); None if it is not a JPEG simplejpeg reads (PIL's header reader decides then)."""
    if simplejpeg is None or data[:3] != _JPEG_START:
        return None
    try:
        height, width = simplejpeg.decode_jpeg_header(data)[:2]
    except ValueError:
        return None
    return width, height


def _simplejpeg(data: bytes) -> np.ndarray | None:
    """RGB or grey pixels of a JPEG through simplejpeg; None where it is not the decoder to
    use (not installed, not a JPEG, CMYK/YCCK colour, or a file it refuses: OpenCV then
    decides, so corrupt files are judged as they always were)."""
    if simplejpeg is None or data[:3] != _JPEG_START:
        return None
    try:
        colour = simplejpeg.decode_jpeg_header(data)[2]
        if colour not in ("Gray", "YCbCr", "RGB"):
            return None
        pixels = simplejpeg.decode_jpeg(data, colorspace="GRAY" if colour == "Gray" else "RGB")
    except ValueError:
        return None
    return pixels[:, :, 0] if colour == "Gray" else pixels


def _decode(source: str | Path | bytes, name: str | Path, data: bytes | None = None) -> np.ndarray:
    """The pixels as stored, colour in RGB(A) order; `data`: the file's bytes, if read."""
    in_memory = isinstance(source, bytes)
    data = source if in_memory else data if data is not None else Path(source).read_bytes()
    pixels = _simplejpeg(data)
    if pixels is not None:
        return pixels
    # imread, not imdecode, for JPEG files: the two judge a truncated JPEG differently
    # (imread keeps what libjpeg recovered), and files have always been read with imread.
    # Every other file is decoded from the bytes already read for its header.
    if not data:  # OpenCV asserts on an empty buffer (a cv2.error traceback)
        raise DataError(
            f"cannot decode image {name}: the file is empty (0 bytes); replace or remove it"
        )
    try:
        pixels = (
            cv2.imread(str(source), cv2.IMREAD_UNCHANGED)
            if not in_memory and data[:3] == _JPEG_START
            else cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        )
    except cv2.error:  # OpenCV's assertions on malformed input
        pixels = None
    if pixels is None or pixels.size == 0:
        raise DataError(
            f"cannot decode image {name}: the file is corrupt or not an image; replace or remove it"
        )
    if pixels.ndim == 3 and pixels.shape[2] >= 3:  # OpenCV decodes to BGR(A)
        four = pixels.shape[2] == 4
        if pixels.dtype in (np.uint8, np.uint16, np.float32):  # the types cvtColor takes
            pixels = cv2.cvtColor(pixels, cv2.COLOR_BGRA2RGBA if four else cv2.COLOR_BGR2RGB)
        else:
            pixels = np.ascontiguousarray(pixels[:, :, [2, 1, 0, 3] if four else [2, 1, 0]])
    return pixels


def check_image(path: str | Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> None:
    """Raise `DataError` unless `path` looks decodable and within the pixel limit.

    Reads only the header where PIL or pydicom knows the format (cheap: catches non-images,
    non-image DICOM, truncated headers and decompression bombs); other files are decoded
    once to find out.
    """
    if is_dicom_file(path):
        check_dicom(path, path, max_pixels)
        return
    size = image_size(path)
    if size is None:
        pixels = _decode(path, path)
        size = pixels.shape[1], pixels.shape[0]
    check_pixel_count(path, *size, max_pixels)


def read_raw(
    source: str | Path | bytes,
    name: str | Path | None = None,
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    dicom: DicomOptions | None = None,
) -> np.ndarray:
    """Decode a file (or its bytes) to its pixels as stored: [H, W] or [H, W, C] in RGB(A)
    order, in the file's own type (uint8, uint16, int16, float32...), not scaled. DICOM
    files (by name or preamble) are windowed as `dicom` says (see vittune.data.dicom).

    The pixel count declared in the header is checked before decoding, so a small file that
    inflates to gigabytes is refused without allocating them. `name` labels errors (the path
    by default).
    """
    in_memory = isinstance(source, bytes | bytearray | memoryview)
    name = name if name is not None else ("<bytes>" if in_memory else source)
    source = bytes(source) if in_memory else source
    data = source if in_memory else Path(source).read_bytes()
    if looks_like_dicom(data, name):
        return read_dicom(data, name, max_pixels, dicom)
    size = _jpeg_size(data) or image_size(data)
    if size is not None:
        check_pixel_count(name, *size, max_pixels)
    pixels = _decode(source, name, data)
    if size is None:  # no header PIL could read: check what OpenCV decoded
        check_pixel_count(name, pixels.shape[1], pixels.shape[0], max_pixels)
    return pixels


def to_float(pixels: np.ndarray, in_chans: int = 3, intensity: str = "dtype") -> np.ndarray:
    """Raw pixels (`read_raw`) to contiguous float32 [H, W, in_chans] in [0, 1]."""
    pixels = scale_intensity(pixels, intensity)
    return np.ascontiguousarray(match_channels(pixels, in_chans), dtype=np.float32)


def read_image(
    path: str | Path,
    in_chans: int = 3,
    intensity: str = "dtype",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    dicom: DicomOptions | None = None,
) -> np.ndarray:
    """Decode any PNG/JPEG/TIFF/BMP (8 or 16 bit, grey, RGB, RGBA, palette) or DICOM image to
    float32 [H, W, C].

    The pixel count declared in the header is checked before decoding, so a small file that
    inflates to gigabytes is refused without allocating them.
    """
    return to_float(read_raw(path, path, max_pixels, dicom), in_chans, intensity)


def read_image_bytes(
    data: bytes,
    name: str,
    in_chans: int = 3,
    intensity: str = "dtype",
    max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
    dicom: DicomOptions | None = None,
) -> np.ndarray:
    """`read_image` for a file's bytes already in memory (shards, object storage); `name`
    labels errors (and marks DICOM by its suffix)."""
    return to_float(read_raw(bytes(data), name, max_pixels, dicom), in_chans, intensity)
