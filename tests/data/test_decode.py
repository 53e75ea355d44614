"""Decoding PNG/JPEG/TIFF, 8/16-bit, grey/RGB/RGBA/palette, checked against other decoders.

References are PIL (for what PIL reads and writes faithfully) and a hand-written PNG encoder
(16-bit colour, which PIL cannot write), so OpenCV is never compared with itself.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from helpers import write_png
from PIL import Image

from vittune.data.decode import (
    check_image,
    image_size,
    read_image,
    read_image_bytes,
    read_raw,
    scale_intensity,
    to_float,
)
from vittune.errors import DataError

RNG = np.random.default_rng(0)


def pil_rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


@pytest.mark.parametrize("suffix", [".png", ".tif", ".bmp"])
def test_8bit_rgb_matches_pil(tmp_path: Path, suffix: str) -> None:
    pixels = RNG.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    path = tmp_path / f"rgb{suffix}"
    Image.fromarray(pixels, mode="RGB").save(path)
    decoded = read_image(path, in_chans=3)
    assert decoded.shape == (12, 10, 3) and decoded.dtype == np.float32
    np.testing.assert_allclose(decoded, pixels / 255.0, atol=1e-6)  # RGB order, not BGR


def test_jpeg_grey_and_rgb_match_pil(tmp_path: Path) -> None:
    smooth = np.linspace(0, 255, 16 * 16).reshape(16, 16).astype(np.uint8)
    colour = np.stack([smooth, smooth.T, 255 - smooth], axis=2)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "c.jpg", quality=95)
    Image.fromarray(smooth, mode="L").save(tmp_path / "g.jpeg", quality=95)
    # Two JPEG decoders may round the inverse DCT differently: allow a couple of levels.
    np.testing.assert_allclose(
        read_image(tmp_path / "c.jpg"), pil_rgb(tmp_path / "c.jpg"), atol=3 / 255
    )
    grey = read_image(tmp_path / "g.jpeg", in_chans=1)
    assert grey.shape == (16, 16, 1)
    reference = np.asarray(Image.open(tmp_path / "g.jpeg"), dtype=np.float32) / 255.0
    np.testing.assert_allclose(grey[:, :, 0], reference, atol=3 / 255)


def test_palette_png_decodes_to_its_colours(tmp_path: Path) -> None:
    index = RNG.integers(0, 4, (9, 7), dtype=np.uint8)
    image = Image.fromarray(index, mode="P")
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    image.save(tmp_path / "p.png")
    image.save(tmp_path / "pt.png", transparency=0)  # palette with alpha decodes as RGBA
    for name in ("p.png", "pt.png"):
        decoded = read_image(tmp_path / name, in_chans=3)
        assert decoded.shape == (9, 7, 3)
        np.testing.assert_allclose(decoded, pil_rgb(tmp_path / name), atol=1e-6)


def test_rgba_drops_alpha_and_grey_alpha_keeps_grey(tmp_path: Path) -> None:
    rgba = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), rgba[:, :, :3] / 255.0, atol=1e-6)
    grey_alpha = np.stack([rgba[:, :, 0], rgba[:, :, 3]], axis=2)
    Image.fromarray(grey_alpha, mode="LA").save(tmp_path / "la.png")
    np.testing.assert_allclose(
        read_image(tmp_path / "la.png", in_chans=1)[:, :, 0], rgba[:, :, 0] / 255.0, atol=1e-5
    )


def test_16bit_grey_png_and_tiff_keep_every_level(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 65536, (10, 11), dtype=np.uint16)
    pixels[0, :3] = [1000, 1001, 65535]  # neighbouring levels stay distinct; the top maps to 1.0
    for name in ("g.png", "g.tif"):
        Image.fromarray(pixels).save(tmp_path / name)  # PIL writes 16-bit grey as "I;16"
        decoded = read_image(tmp_path / name, in_chans=1)
        assert decoded.shape == (10, 11, 1) and decoded.dtype == np.float32
        np.testing.assert_array_equal(np.round(decoded[:, :, 0] * 65535), pixels)
        assert decoded[0, 0, 0] < decoded[0, 1, 0] < decoded[0, 2, 0] == 1.0


def test_16bit_rgb_and_rgba_png_are_not_reduced_to_8_bits(tmp_path: Path) -> None:
    for channels in (3, 4):
        pixels = RNG.integers(0, 65536, (7, 9, channels), dtype=np.uint16)
        pixels[0, 0, :3] = [258, 257, 256]  # one 8-bit level apart from each other: 1 / 257
        decoded = read_image(write_png(tmp_path / f"c{channels}.png", pixels), in_chans=3)
        np.testing.assert_array_equal(np.round(decoded * 65535), pixels[:, :, :3])


def test_dim_12bit_data_in_16bit_files_keeps_its_levels(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 4096, (8, 8), dtype=np.uint16)
    pixels[0, 0], pixels[0, 1] = 0, 4095
    path = write_png(tmp_path / "ct.png", pixels)
    by_dtype = read_image(path, in_chans=1, intensity="dtype")[:, :, 0]
    np.testing.assert_allclose(by_dtype, pixels / 65535.0, rtol=1e-6)  # dim, but not saturated
    stretched = read_image(path, in_chans=1, intensity="minmax")[:, :, 0]
    np.testing.assert_allclose(stretched, pixels / 4095.0, rtol=1e-5, atol=1e-7)
    assert len(np.unique(stretched)) == len(np.unique(pixels))


def test_signed_16bit_ct_values_stay_in_range_and_in_order(tmp_path: Path) -> None:
    # Hounsfield units are negative for air and fat; scaling must not push them below 0.
    hounsfield = np.array([[-32768, -1000, -1], [0, 1000, 32767]], dtype=np.int16)
    path = tmp_path / "ct.tif"
    assert cv2.imwrite(str(path), hounsfield)  # PIL cannot write int16 TIFF; OpenCV can
    decoded = read_image(path, in_chans=1)[:, :, 0].ravel()
    np.testing.assert_allclose(decoded, (hounsfield.ravel() + 32768.0) / 65535.0, atol=1e-7)
    assert decoded[0] == 0.0 and decoded[-1] == 1.0 and np.all(np.diff(decoded) > 0)
    stretched = read_image(path, in_chans=1, intensity="minmax")[:, :, 0].ravel()
    assert stretched.min() == 0.0 and stretched.max() == 1.0


def test_in_chans_1_keeps_grey_single_channel_and_converts_rgb_to_luma(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(grey, mode="L").save(tmp_path / "g.png")
    assert read_image(tmp_path / "g.png", in_chans=1).shape == (8, 8, 1)
    three = read_image(tmp_path / "g.png", in_chans=3)
    assert three.shape == (8, 8, 3) and np.all(three == three[:, :, :1])
    colour = RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(colour, mode="RGB").save(tmp_path / "c.png")
    luma = read_image(tmp_path / "c.png", in_chans=1)[:, :, 0]
    reference = np.asarray(Image.open(tmp_path / "c.png").convert("L"), dtype=np.float32) / 255
    np.testing.assert_allclose(luma, reference, atol=1 / 255)  # PIL rounds to integer levels


def test_channel_mismatch_and_corrupt_files_are_data_errors(tmp_path: Path) -> None:
    Image.fromarray(RNG.integers(0, 256, (4, 4, 3), dtype=np.uint8)).save(tmp_path / "c.png")
    with pytest.raises(DataError, match="set model.in_chans to 3"):
        read_image(tmp_path / "c.png", in_chans=2)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="corrupt or not an image"):
        read_image(broken)


def test_float_and_constant_images_scale_safely() -> None:
    assert scale_intensity(np.full((2, 2), 7, np.uint16), "minmax").max() == 0.0  # no 0 / 0
    floats = np.array([[0.0, 0.5], [2.0, 4.0]], dtype=np.float32)
    np.testing.assert_allclose(scale_intensity(floats), floats / 4.0)


def write_bomb_png(path: Path, side: int = 20000) -> Path:
    """A real decompression bomb: an 8-bit grey PNG of side x side zeros, deflated to ~0.4 MB.

    Written row block by row block, so the test never holds the 400 MB of pixels itself.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    deflate, rows = zlib.compressobj(9), bytes((side + 1) * 100)  # filter byte 0 + pixels
    idat = b"".join(deflate.compress(rows) for _ in range(side // 100)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


# Decodes the file in a fresh process and reports its peak memory. The address space is capped
# at 2 GiB so that, should the pixel limit ever stop working, the test fails instead of the
# machine paying the 6 GB that decoding this bomb to float32 RGB costs (measured: 6.3 GB RSS).
DECODE_IN_A_FRESH_PROCESS = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from vittune.data.decode import read_image
from vittune.errors import DataError
try:
    read_image(sys.argv[1], in_chans=3)
    print("decoded")
except DataError as err:
    print(err)
# Peak RSS of this address space: getrusage's ru_maxrss would include the (large) pytest
# process this one was forked from, as Linux keeps it across exec.
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(int(status["VmHWM"].split()[0]) // 1024)  # KiB -> MiB
"""


def test_a_decompression_bomb_is_refused_from_its_header_with_little_memory(
    tmp_path: Path,
) -> None:
    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 500_000  # 400 MB of pixels in under 0.5 MB
    assert image_size(bomb) == (20000, 20000)
    result = subprocess.run(
        [sys.executable, "-c", DECODE_IN_A_FRESH_PROCESS, str(bomb)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=True,
    )
    message, peak_mib = result.stdout.strip().splitlines()
    assert message.startswith(f"{bomb} declares 20000 x 20000 pixels (400 MP)"), message
    assert "data.max_image_pixels (89,478,485)" in message
    assert int(peak_mib) < 500, f"peak RSS {peak_mib} MiB: the bomb was decoded"
    with pytest.raises(DataError, match="decompression bomb"):
        check_image(bomb)


def test_the_pixel_limit_is_exact_and_can_be_turned_off(tmp_path: Path) -> None:
    path = write_png(tmp_path / "wide.png", RNG.integers(0, 256, (50, 100), dtype=np.uint8))
    assert read_image(path, in_chans=1, max_pixels=5000).shape == (50, 100, 1)  # 100 x 50: at it
    with pytest.raises(DataError, match="100 x 50 pixels .* data.max_image_pixels \\(4,999\\)"):
        read_image(path, in_chans=1, max_pixels=4999)
    with pytest.raises(DataError, match="raise data.max_image_pixels"):
        check_image(path, max_pixels=4999)
    for unlimited in (None, 0):
        check_image(path, max_pixels=unlimited)
        assert read_image(path, in_chans=1, max_pixels=unlimited).shape == (50, 100, 1)


@pytest.mark.parametrize(
    ("suffix", "dtype", "channels"),
    [
        (".png", np.uint16, 3),
        (".jpg", np.uint8, 3),
        (".tif", np.int16, 1),
        (".bmp", np.uint8, 3),
        (".webp", np.uint8, 3),
    ],
)
def test_image_size_reads_the_header_of_every_suffix(
    tmp_path: Path, suffix: str, dtype: type, channels: int
) -> None:
    path = tmp_path / f"image{suffix}"
    assert cv2.imwrite(str(path), np.zeros((13, 29, channels), dtype=dtype).squeeze())
    assert image_size(path) == (29, 13)  # (width, height), as the header declares them


def test_files_pil_cannot_parse_are_decoded_to_check_them(tmp_path: Path) -> None:
    # OpenCV writes and reads float RGB TIFFs; PIL does not know them, so the header check
    # falls back to decoding them (and still applies the pixel limit), and refuses non-images.
    floats = tmp_path / "float.tif"
    assert cv2.imwrite(str(floats), RNG.random((6, 5, 3)).astype(np.float32))
    assert image_size(floats) is None
    check_image(floats)
    with pytest.raises(DataError, match="5 x 6 pixels"):
        check_image(floats, max_pixels=29)
    with pytest.raises(DataError, match="5 x 6 pixels"):
        read_image(floats, max_pixels=29)
    for name, content in [("text.png", b"not an image"), ("cut.png", b"\x89PNG\r\n\x1a\n\0\0")]:
        (tmp_path / name).write_bytes(content)
        assert image_size(tmp_path / name) is None
        with pytest.raises(DataError, match="corrupt or not an image"):
            check_image(tmp_path / name)


def test_read_image_bytes_equals_read_image_and_checks_the_header(tmp_path):
    """Shards and object storage hand over bytes: same pixels, same limits, same errors."""
    rng = np.random.default_rng(0)
    png = tmp_path / "a.png"
    cv2.imwrite(str(png), rng.integers(0, 65535, (20, 30, 3), dtype=np.uint16))
    np.testing.assert_array_equal(
        read_image_bytes(png.read_bytes(), "a.png", 3), read_image(png, 3)
    )
    with pytest.raises(DataError, match="a.png declares 30 x 20"):
        read_image_bytes(png.read_bytes(), "a.png", 3, max_pixels=100)
    with pytest.raises(DataError, match="cannot decode image broken.jpg"):
        read_image_bytes(b"\xff\xd8 not really a jpeg", "broken.jpg", 3)


def _photo(height: int = 48, width: int = 40) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    smooth = 128 + 60 * np.sin(rows / 5.0) * np.cos(cols / 7.0)
    noisy = smooth[:, :, None] + RNG.normal(0, 12, (height, width, 3))
    return np.clip(noisy, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("progressive", [False, True])
def test_the_jpeg_decoder_gives_opencvs_pixels_and_pils_within_two_levels(
    tmp_path: Path, progressive: bool
) -> None:
    colour, path, grey_path = _photo(), tmp_path / "c.jpg", tmp_path / "g.jpg"
    Image.fromarray(colour).save(path, quality=90, progressive=progressive)
    Image.fromarray(colour[:, :, 0]).save(grey_path, quality=90, progressive=progressive)
    raw, grey = read_raw(path), read_raw(grey_path)
    assert raw.dtype == np.uint8 and raw.shape == (48, 40, 3) and grey.shape == (48, 40)
    # Both use libjpeg-turbo's default (islow) inverse DCT and smooth upsampling: the same
    # pixels; PIL's build may differ by a rounding or two.
    opencv = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)[:, :, ::-1]
    assert np.abs(raw.astype(int) - opencv).max() <= 1
    np.testing.assert_array_equal(grey, cv2.imread(str(grey_path), cv2.IMREAD_UNCHANGED))
    assert np.abs(raw.astype(int) - np.asarray(Image.open(path))).max() <= 2


def test_jpegs_the_fast_decoder_refuses_are_judged_by_opencv(tmp_path: Path) -> None:
    Image.fromarray(_photo()).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    opencv = cv2.imread(str(tmp_path / "cmyk.jpg"), cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(read_raw(tmp_path / "cmyk.jpg"), opencv[:, :, ::-1])
    cut = tmp_path / "cut.jpg"
    Image.fromarray(_photo()).save(cut, quality=90)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # premature end of the pixel data
    opencv = cv2.imread(str(cut), cv2.IMREAD_UNCHANGED)
    if opencv is None:
        with pytest.raises(DataError, match="corrupt or not an image"):
            read_raw(cut)
    else:  # libjpeg-turbo fills the missing part and warns: as before, the file is kept
        np.testing.assert_array_equal(read_raw(cut), opencv[:, :, ::-1])


def test_read_raw_keeps_the_stored_type_and_read_image_is_to_float_of_it(tmp_path: Path) -> None:
    pixels = RNG.integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    write_png(tmp_path / "c.png", pixels)
    raw = read_raw(tmp_path / "c.png")
    np.testing.assert_array_equal(raw, pixels)  # RGB order, every level
    np.testing.assert_array_equal(read_image(tmp_path / "c.png"), to_float(raw))
