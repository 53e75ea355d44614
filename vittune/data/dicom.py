"""DICOM files as images: the pixels a radiologist reads, as 16-bit integers.

pydicom (the `medical` extra, imported only when a DICOM file is met) parses the file,
decompresses it (RLE natively; JPEG lossless/baseline and JPEG 2000 through pylibjpeg's
plugins), masks the bits beyond BitsStored, sign-extends signed pixels and converts YBR
colour to RGB. Grey images then go through the modality LUT (RescaleSlope/Intercept or a
Modality LUT Sequence), the VOI window (`data.dicom_window`) and, for MONOCHROME1, an
inversion, so dense tissue is bright in every image. The result is uint16 spanning the
window (0 = window bottom, 65535 = top) so the rest of vittune (integer augmentation, the
decoded cache, `data.intensity: dtype`) treats it like any 16-bit PNG.

No header value is ever put into a message: errors name the file and vittune's own reason,
never a patient name, an ID or a date.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vittune.data.pixel_limit import check_pixel_count
from vittune.errors import DataError

DICOM_SUFFIXES = (".dcm", ".dicom")
_MAGIC = b"DICM"  # PS3.10: 128-byte preamble, then these four bytes
_TOP = 65535  # the windowed image is stored as uint16


@dataclass(frozen=True)
class DicomOptions:
    """How DICOM pixels become an image (`data.dicom_window`, `data.dicom_frame`)."""

    window: str | tuple[float, float] = "auto"  # auto | none | (center, width)
    # middle | first | all: which frame of a multi-frame file; an int: that frame (a sample
    # of `all`); `all` without an index (predict, attention) reads the middle frame
    frame: str | int = "middle"


def options_from(cfg: object) -> DicomOptions:
    """The DICOM settings of a `DataConfig` (defaults for configs without them)."""
    window = getattr(cfg, "dicom_window", "auto")
    return DicomOptions(
        window=tuple(window) if isinstance(window, list | tuple) else window,
        frame=getattr(cfg, "dicom_frame", "middle"),
    )


def looks_like_dicom(prefix: bytes, name: str | Path = "") -> bool:
    """A `.dcm`/`.dicom` name, or the PS3.10 preamble (extension-less files from PACS)."""
    return str(name).lower().endswith(DICOM_SUFFIXES) or prefix[128:132] == _MAGIC


def is_dicom_file(path: str | Path) -> bool:
    """`looks_like_dicom` for a file on disk (reads its first 132 bytes)."""
    with open(path, "rb") as handle:
        return looks_like_dicom(handle.read(132), path)


def _pydicom():
    try:
        import pydicom  # noqa: PLC0415 (optional: the medical extra)
    except ImportError:
        raise DataError("DICOM files need pydicom: pip install 'vittune[medical]'") from None
    return pydicom


def _parse(source: bytes | str | Path, name: str | Path, header_only: bool):
    """The dataset (pixel data not decoded; deferred, unread, when `header_only`)."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(
            io.BytesIO(source) if isinstance(source, bytes) else str(source),
            force=True,  # `.dcm` files without the preamble (older writers) still parse
            defer_size=256 if header_only else None,
        )
    except Exception as err:  # pydicom raises many types for broken files
        raise DataError(
            f"cannot read DICOM {name}: {type(err).__name__} (truncated or not DICOM); "
            "replace or remove it"
        ) from None


def _check_image_dataset(ds, name: str | Path, max_pixels: int | None) -> None:
    """Refuse what is not an image (DICOMDIR, SR, presentation states), syntaxes without a
    decoder here, and frames above the pixel limit, before any pixel is decoded."""
    from pydicom.pixels import get_decoder  # noqa: PLC0415

    if not any(k in ds for k in ("SOPClassUID", "PixelData", "DirectoryRecordSequence")):
        raise DataError(
            f"{name} is not a DICOM file (no DICOM image elements); replace or remove it"
        )
    if "PixelData" not in ds or "Rows" not in ds or "Columns" not in ds:
        kind = "a DICOMDIR" if "DirectoryRecordSequence" in ds else "not an image"
        sop = getattr(getattr(ds, "SOPClassUID", None), "name", None)
        raise DataError(
            f"{name} is DICOM without pixel data ({kind}{f', {sop}' if sop else ''}); "
            "left out, remove it from the data to silence this"
        )
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_compressed:
        try:
            decoder = get_decoder(syntax)
        except NotImplementedError:
            decoder = None
        if decoder is None or not decoder.is_available:
            raise DataError(
                f"{name}: no DICOM decoder here for transfer syntax {syntax.name}; install "
                "'vittune[medical]' (pylibjpeg plugins) or convert the file"
            )
    check_pixel_count(name, int(ds.Columns), int(ds.Rows), max_pixels)


def check_dicom(source: bytes | str | Path, name: str | Path, max_pixels: int | None) -> None:
    """The header check of `drop_unreadable`: `DataError` unless the file is a decodable image
    (large elements such as the pixel data are skipped, not read; a file cut short in its
    pixel data passes here and is left out when decoded, like a truncated PNG)."""
    _check_image_dataset(_parse(source, name, header_only=True), name, max_pixels)


def modality_range(ds) -> tuple[float, float]:
    """The values the modality LUT can produce from the stored range (BitsStored, sign):
    the output range of PS3.3 C.11.2.1.2, which pydicom's windowing maps onto as well."""
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** ds.ModalityLUTSequence[0].LUTDescriptor[2] - 1)
    bits = int(ds.BitsStored)
    low, high = (
        (0, 2**bits - 1)
        if ds.PixelRepresentation == 0
        else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    )
    slope, intercept = (
        float(ds.get("RescaleSlope", 1) or 1),
        float(ds.get("RescaleIntercept", 0) or 0),
    )
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def window_fraction(values: np.ndarray, ds, window: str | tuple[float, float]) -> np.ndarray:
    """Modality values -> float64 [0, 1] through the chosen VOI transform (grey images)."""
    from pydicom.pixels import apply_voi_lut, apply_windowing  # noqa: PLC0415

    low, high = modality_range(ds)
    if window == "auto" and ds.get("VOILUTSequence"):  # a lookup table: its own output range
        values = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        low, high = 0.0, float(2 ** ds.VOILUTSequence[0].LUTDescriptor[2] - 1)
    elif window == "auto" and "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_windowing(values, ds, index=0)
    elif isinstance(window, tuple):
        header = ds.copy()  # a shallow copy: pydicom reads the window from a dataset
        for keyword in ("VOILUTSequence", "VOILUTFunction"):
            if keyword in header:
                delattr(header, keyword)
        header.WindowCenter, header.WindowWidth = float(window[0]), float(window[1])
        values = apply_windowing(values, header, index=0)
    # "none", or auto without a window: the full range the modality LUT can produce
    if high <= low:
        return np.zeros(values.shape, np.float64)
    return np.clip((np.asarray(values, np.float64) - low) / (high - low), 0.0, 1.0)


def _frame_index(ds, frame: str | int, name: str | Path) -> int | None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if isinstance(frame, int):
        if not 0 <= frame < frames:
            raise DataError(
                f"{name} has {frames} frame(s), not a frame {frame}; scan the data again"
            )
        return frame if frames > 1 else None
    if frames <= 1:
        return None
    return 0 if frame == "first" else frames // 2


def frame_count(path: str | Path) -> int:
    """Frames of a DICOM file, from its header (1 for single-frame files)."""
    return int(_parse(path, path, header_only=True).get("NumberOfFrames", 1) or 1)


def read_dicom(
    data: bytes, name: str | Path, max_pixels: int | None, options: DicomOptions | None = None
) -> np.ndarray:
    """Decode one DICOM image: uint16 [H, W] for grey (windowed, MONOCHROME1 inverted),
    [H, W, 3] RGB as stored for colour. `DataError` for anything that is not a usable image."""
    from pydicom.pixels import apply_modality_lut  # noqa: PLC0415

    options = options or DicomOptions()
    ds = _parse(data, name, header_only=False)
    _check_image_dataset(ds, name, max_pixels)
    index = _frame_index(ds, options.frame, name)
    try:
        ds.pixel_array_options(index=index)
        pixels = ds.pixel_array  # [H, W] or [H, W, 3]; YBR converted to RGB by pydicom
    except Exception as err:  # truncated pixel data, a broken codestream, a decoder's refusal
        raise DataError(
            f"cannot decode DICOM pixels of {name}: {' '.join(str(err).split())[:160]}; "
            "replace or remove it"
        ) from None
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        return np.ascontiguousarray(pixels)  # colour: no modality LUT or window applies
    values = apply_modality_lut(pixels, ds)
    fraction = window_fraction(values, ds, options.window)  # [H, W] float64 in [0, 1]
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        fraction = 1.0 - fraction  # MONOCHROME1 shows low values white
    return np.rint(fraction * _TOP).astype(np.uint16)
