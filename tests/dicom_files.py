"""Generated DICOM files for the medical-path tests (pydicom writes them; nothing downloaded).

Every file carries a patient ID and the planted patient name `PLANTED_NAME`, so a test can
grep a run's outputs for it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

PLANTED_NAME = "Zyxwvut^Plantedname"  # must never appear in anything vittune writes


def dicom_dataset(
    pixels: np.ndarray,
    *,
    bits_stored: int | None = None,
    photometric: str | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    patient_id: str = "P000",
    frames: bool = False,
) -> Dataset:
    """A DICOM image dataset around `pixels` ([H, W], [H, W, 3], or [F, H, W] with frames)."""
    meta = FileMetaDataset()
    sop_class = CTImageStorage if slope is not None else SecondaryCaptureImageStorage
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = PLANTED_NAME, patient_id
    ds.PatientBirthDate, ds.StudyDate, ds.StudyTime = "19700101", "20260102", "101500"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
    ds.Modality = "CT" if slope is not None else "OT"
    colour = pixels.ndim == 3 and not frames
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = photometric or ("RGB" if colour else "MONOCHROME2")
    if colour:
        ds.PlanarConfiguration = 0
    if frames:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-3 if colour else -2], pixels.shape[-2 if colour else -1]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept or 0.0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def write_dicom(path: Path, pixels: np.ndarray, *, syntax=None, **header: object) -> Path:
    """Write `pixels` as a DICOM file; `syntax`: a compressed transfer syntax UID (RLE, JPEG 2000)."""
    ds = dicom_dataset(pixels, **header)
    if syntax is not None:
        ds.compress(syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_dicomdir(folder: Path, image: Path) -> Path:
    """A DICOMDIR (a file-set index, no pixel data) listing `image`, written by pydicom."""
    from pydicom.fileset import FileSet  # noqa: PLC0415

    fileset = FileSet()
    fileset.add(pydicom.dcmread(image))
    fileset.write(folder)
    return folder / "DICOMDIR"
