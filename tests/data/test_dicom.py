"""DICOM reading: each case against pydicom's own LUT functions or the standard's formula."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_files import PLANTED_NAME, write_dicom, write_dicomdir
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import JPEG2000Lossless, RLELossless

from vittune.data.decode import check_image, is_image_file, read_image, read_raw
from vittune.data.dicom import DicomOptions
from vittune.errors import DataError

RNG = np.random.default_rng(19)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 (LINEAR) onto [0, 1], written from the standard."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5).astype(np.float64)
    return np.where(x <= low, 0.0, np.where(x > high, 1.0, y))


def _u16(fraction: np.ndarray) -> np.ndarray:
    return np.rint(fraction * 65535).astype(np.uint16)


def test_12_bit_auto_window_equals_pydicoms_voi_lut(tmp_path: Path) -> None:
    stored = RNG.integers(0, 4096, (24, 20)).astype(np.uint16)
    path = write_dicom(tmp_path / "a.dcm", stored, bits_stored=12, window=(1800.0, 900.0))
    ds = pydicom.dcmread(path)
    reference = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)  # in [0, 4095]
    ours = read_raw(path)
    assert ours.dtype == np.uint16
    np.testing.assert_array_equal(ours, _u16(reference / 4095))
    np.testing.assert_array_equal(ours, _u16(_linear_window(stored, 1800.0, 900.0)))


def test_signed_ct_with_rescale_and_a_given_window(tmp_path: Path) -> None:
    stored = RNG.integers(-2000, 2000, (16, 16)).astype(np.int16)
    path = write_dicom(tmp_path / "ct.dcm", stored, slope=1.0, intercept=-1024.0, window=(0, 10))
    hounsfield = stored.astype(np.float64) - 1024.0
    ours = read_raw(path, dicom=DicomOptions(window=(40.0, 400.0)))  # soft tissue, not the file's
    np.testing.assert_array_equal(ours, _u16(_linear_window(hounsfield, 40.0, 400.0)))
    # `none`: the full stored int16 range after the rescale
    full = read_raw(path, dicom=DicomOptions(window="none"))
    np.testing.assert_array_equal(full, _u16((stored.astype(np.float64) + 32768) / 65535))


def test_bits_stored_masks_the_unused_high_bits(tmp_path: Path) -> None:
    stored = RNG.integers(0, 4096, (8, 8)).astype(np.uint16)
    dirty = stored | 0xF000  # garbage above bit 11, as some modalities write (overlays)
    path = write_dicom(tmp_path / "b.dcm", dirty, bits_stored=12)
    np.testing.assert_array_equal(read_raw(path), _u16(stored / 4095))  # no window: 0..4095


def test_monochrome1_is_inverted_against_monochrome2(tmp_path: Path) -> None:
    stored = RNG.integers(0, 256, (10, 12)).astype(np.uint8)
    two = read_raw(write_dicom(tmp_path / "m2.dcm", stored))
    one = read_raw(write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(two, _u16(stored / 255))
    np.testing.assert_array_equal(one, 65535 - two)


def test_rgb_and_ybr_colour(tmp_path: Path) -> None:
    rgb = RNG.integers(0, 256, (12, 10, 3)).astype(np.uint8)
    np.testing.assert_array_equal(read_raw(write_dicom(tmp_path / "rgb.dcm", rgb)), rgb)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    path = write_dicom(tmp_path / "ybr.dcm", ybr, photometric="YBR_FULL")
    back = read_raw(path).astype(int)
    assert np.abs(back - rgb.astype(int)).max() <= 2  # a colour-space round trip, rounded twice
    assert read_image(path, in_chans=3).shape == (12, 10, 3)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless], ids=["rle", "jpeg2000"])
def test_compressed_syntaxes_decode_to_the_uncompressed_pixels(tmp_path: Path, syntax) -> None:
    stored = RNG.integers(0, 4096, (32, 32)).astype(np.uint16)
    plain = read_raw(write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12))
    path = write_dicom(tmp_path / "packed.dcm", stored, bits_stored=12, syntax=syntax)
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_raw(path), plain)


def test_multi_frame_middle_and_first(tmp_path: Path) -> None:
    frames = RNG.integers(0, 256, (5, 8, 9)).astype(np.uint8)
    path = write_dicom(tmp_path / "mf.dcm", frames, frames=True)
    np.testing.assert_array_equal(read_raw(path), _u16(frames[2] / 255))
    first = read_raw(path, dicom=DicomOptions(frame="first"))
    np.testing.assert_array_equal(first, _u16(frames[0] / 255))


def test_extension_less_dicom_is_found_by_its_preamble(tmp_path: Path) -> None:
    stored = RNG.integers(0, 256, (6, 6)).astype(np.uint8)
    path = write_dicom(tmp_path / "1.2.840.99", stored)
    bare = path.rename(tmp_path / "IM0001")
    assert is_image_file(bare)
    (tmp_path / "notes").write_text("not an image")
    assert not is_image_file(tmp_path / "notes")
    np.testing.assert_array_equal(read_raw(bare), _u16(stored / 255))


def test_unusable_dicom_is_refused_with_a_reason_and_no_phi(tmp_path: Path) -> None:
    stored = RNG.integers(0, 4096, (16, 16)).astype(np.uint16)
    good = write_dicom(tmp_path / "good.dcm", stored, bits_stored=12)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(good.read_bytes()[:-100])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 64)
    dicomdir = write_dicomdir(tmp_path / "set", good)
    messages = []
    for path, reason in [(dicomdir, r"\(a DICOMDIR\)"), (junk, "not a DICOM file")]:
        with pytest.raises(DataError, match=reason) as err:
            check_image(path)
        messages.append(str(err.value))
    check_image(cut)  # the header is whole: the pixels are cut short
    with pytest.raises(DataError, match="pixel data is less than expected") as err:
        read_raw(cut)
    messages.append(str(err.value))
    with pytest.raises(DataError, match="max_image_pixels"):
        check_image(good, max_pixels=100)  # refused from the header: 256 pixels declared
    assert not any(PLANTED_NAME.split("^")[0] in m for m in messages)


def test_missing_pydicom_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_dicom(tmp_path / "a.dcm", np.zeros((4, 4), np.uint8))
    monkeypatch.setitem(sys.modules, "pydicom", None)  # as if the extra were not installed
    with pytest.raises(DataError, match=r"vittune\[medical\]"):
        read_raw(path)


@pytest.mark.parametrize("name", ["a.dcm", "IM000001"])  # named, or extension-less as from PACS
def test_the_decoded_cache_holds_the_windowed_pixels_and_keys_on_the_window(
    tmp_path: Path, name: str
) -> None:
    from vittune.data.cache import build_memory_cache, cache_key

    stored = RNG.integers(0, 4096, (12, 12)).astype(np.uint16)
    path = write_dicom(tmp_path / name, stored, bits_stored=12, window=(2048.0, 4096.0))
    lung = DicomOptions(window=(1000.0, 500.0))
    cache = build_memory_cache([path], None, dicom=lung)
    np.testing.assert_array_equal(cache.get(0), read_raw(path, dicom=lung))
    assert not np.array_equal(cache.get(0), read_raw(path))  # the file's own window differs
    assert cache_key([path], None, lung) != cache_key([path], None, DicomOptions())


def test_litdata_items_decode_dicom_bytes_like_files(tmp_path: Path) -> None:
    """Shards hold a file's bytes and its source path: the same pixels as from the file."""
    from vittune.data.datasets import ImageDataset, Sample
    from vittune.data.streaming import ItemDecoder

    stored = RNG.integers(0, 4096, (10, 10)).astype(np.uint16)
    path = write_dicom(tmp_path / "x.dcm", stored, bits_stored=12, photometric="MONOCHROME1")
    options = DicomOptions(window=(2000.0, 2000.0))
    item = ItemDecoder(None, num_classes=2, in_chans=1, dicom=options)(
        path.read_bytes(), str(path), (1,)
    )
    dataset = ImageDataset([Sample(path, (1,))], 2, None, in_chans=1, dicom=options)
    np.testing.assert_array_equal(item[0].numpy(), dataset[0][0].numpy())


def test_jpeg_baseline_dicom_decodes_as_opencv_decodes_its_codestream(tmp_path: Path) -> None:
    """pydicom has no JPEG baseline encoder: OpenCV writes the codestream, pydicom wraps it
    (encapsulated pixel data, transfer syntax 1.2.840.10008.1.2.4.50), pylibjpeg decodes it."""
    import cv2
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    grey = np.clip(np.add.outer(np.arange(32), np.arange(32)) * 4, 0, 255).astype(np.uint8)
    ok, jpeg = cv2.imencode(".jpg", grey, [cv2.IMWRITE_JPEG_QUALITY, 90])
    assert ok
    path = write_dicom(tmp_path / "jpeg.dcm", grey)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([jpeg.tobytes()])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    expected = cv2.imdecode(jpeg, cv2.IMREAD_UNCHANGED)  # libjpeg-turbo's pixels
    ours = read_raw(path).astype(int)
    assert (
        np.abs(ours - _u16(expected / 255).astype(int)).max() <= 2 * 257
    )  # IDCTs may differ by 1-2
    assert np.abs(ours - _u16(grey / 255).astype(int)).mean() < 3 * 257  # and it is the image


def test_16_bit_unsigned_full_range(tmp_path: Path) -> None:
    stored = RNG.integers(0, 65536, (8, 8)).astype(np.uint16)
    np.testing.assert_array_equal(read_raw(write_dicom(tmp_path / "u16.dcm", stored)), stored)


def test_every_frame_a_sample_and_one_file_in_one_split(tmp_path: Path) -> None:
    from vittune.data.datamodule import scan_sources
    from vittune.data.datasets import ImageDataset
    from vittune.recipe.schema import DataConfig

    clips = {}
    for label in ("a", "b"):
        for k in range(4):
            frames = RNG.integers(0, 256, (3, 6, 6)).astype(np.uint8)
            path = write_dicom(tmp_path / label / f"clip{k}.dcm", frames, frames=True)
            clips[path] = frames
        write_dicom(tmp_path / label / "single.dcm", RNG.integers(0, 256, (6, 6)).astype(np.uint8))
    found = scan_sources(DataConfig(root=str(tmp_path), dicom_frame="all", val_fraction=0.25))
    samples = [s for split in found.splits.values() for s in split]
    assert len(samples) == 2 * (4 * 3 + 1)
    for path in clips:  # each clip whole in one split
        assert sum(any(s.path == path for s in v) for v in found.splits.values()) == 1
    dataset = ImageDataset(samples, 2, None, in_chans=1)
    for index, sample in enumerate(samples):
        if sample.frame is not None:
            expected = _u16(clips[sample.path][sample.frame] / 255)
            np.testing.assert_array_equal(dataset.load_raw(index), expected)
    assert sorted(s.frame for s in samples if s.path in clips)[:3] == [0, 0, 0]
