"""Decode every image once: the raw pixel arrays of a split in one flat buffer (`data.cache`).

Each image is stored as `read_raw` gives it (uint8 / uint16 / ..., before scaling and
augmentation), so a cached epoch does everything an uncached one does except reading and
decoding the files, and gives the same batches for the same seed.

- `memory`: one torch uint8 tensor in shared memory plus offsets and shapes. Forked workers
  inherit it, spawned ones receive its handle (torch's pickler): never a copy per worker.
- `disk`: a file under `data.cache_dir` named by a hash of the file list (paths, sizes,
  modification times) and the decoding settings, memory-mapped by every worker. It is written
  to a temporary file and renamed into place, and ends with its index and a footer, so a
  killed run never leaves a cache that a later run trusts: a short or damaged file fails its
  checks and is rebuilt.

The first fill is one decode pass at setup (`build_cache`), in `num_workers` processes, before
the first epoch: the buffer's layout is known only after decoding (a header does not say
how OpenCV will expand a palette or an alpha channel), the disk file must be complete before
anyone maps it, and under DDP one process per node writes it while the others wait.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vittune.data.decode import image_header, read_raw
from vittune.data.dicom import DICOM_SUFFIXES, DicomOptions
from vittune.data.workers import ignore_stop_signals
from vittune.errors import DataError

FORMAT = b"VTCACHE2"  # the footer's magic; change it when the layout changes (2: checksums)
_FOOTER = 16  # index length (8 bytes, little endian) + FORMAT
RAM_SHARE = 0.5  # `memory` refuses a cache larger than this share of available memory
# bytes per pixel as OpenCV decodes each PIL mode (a palette becomes BGR); unknown: 8
_MODE_BYTES = {"1": 1, "L": 1, "P": 3, "RGB": 3, "RGBA": 4, "LA": 4, "CMYK": 3, "I;16": 2,
               "I;16B": 2, "I;16L": 2, "I": 4, "F": 4}  # fmt: skip


def default_cache_dir() -> Path:
    """`$VITTUNE_CACHE_DIR`, else `~/.cache/vittune/decoded`."""
    if os.environ.get("VITTUNE_CACHE_DIR"):
        return Path(os.environ["VITTUNE_CACHE_DIR"])
    return Path.home() / ".cache" / "vittune" / "decoded"


def cache_key(paths: list[Path], max_pixels: int | None, dicom: DicomOptions | None = None) -> str:
    """A hash of the files (path, size, modification time) and of what decodes them."""
    from vittune.data import decode  # noqa: PLC0415 (the decoder in use is part of the key)

    digest = hashlib.sha256(FORMAT)
    jpeg = f"simplejpeg {decode.simplejpeg.__version__}" if decode.simplejpeg else "none"
    digest.update(f"{max_pixels}|{jpeg}|opencv {cv2.__version__}\n".encode())
    # the window changes the pixels; DICOM files come named .dcm/.dicom or with no suffix at all
    # (PACS exports, found by their preamble: decode.is_image_file)
    maybe_dicom = (p.suffix.lower() in DICOM_SUFFIXES or not p.suffix for p in map(Path, paths))
    if dicom is not None and any(maybe_dicom):
        digest.update(f"dicom {dicom}\n".encode())
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{Path(path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:32]


def estimated_bytes(paths: list[Path]) -> int:
    """Decoded size from the headers (width x height x bytes per pixel of the mode)."""
    total = 0
    for path in paths:
        header = image_header(path)
        if header is not None:
            (width, height), mode = header
            total += width * height * _MODE_BYTES.get(mode, 8)
    return total


@dataclass
class _Index:
    offsets: np.ndarray  # [N] int64, bytes from the buffer's start
    shapes: np.ndarray  # [N, 3] int64; unused dimensions are 0
    dtypes: np.ndarray  # [N] str, numpy dtype names ("" for a file that failed)
    errors: np.ndarray  # [N] str, why a file failed to decode ("" when it did not)
    key: str
    sums: np.ndarray  # [N] uint32, CRC-32 of each image's bytes (0 for a failed file)

    def to_bytes(self) -> bytes:
        out = io.BytesIO()
        np.savez(out, offsets=self.offsets, shapes=self.shapes, dtypes=self.dtypes,
                 errors=self.errors, key=np.array(self.key), sums=self.sums)  # fmt: skip
        return out.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> _Index:
        with np.load(io.BytesIO(data), allow_pickle=False) as saved:
            return cls(saved["offsets"], saved["shapes"], saved["dtypes"], saved["errors"],
                       str(saved["key"]), saved["sums"])  # fmt: skip

    def nbytes(self, index: int) -> int:
        if self.errors[index]:
            return 0
        shape = [int(s) for s in self.shapes[index] if s]
        return int(np.prod(shape)) * np.dtype(str(self.dtypes[index])).itemsize


class DecodedCache:
    """Read-only views of decoded images held in one flat buffer (see the module's notes)."""

    def __init__(self, index: _Index, buffer: torch.Tensor | None, path: Path | None) -> None:
        self.index, self.buffer, self.path = index, buffer, path
        self._data: np.ndarray | None = None  # [bytes] uint8 view, made in each process

    def __len__(self) -> int:
        return len(self.index.offsets)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_data": None}  # a memory map is reopened, never pickled

    def _bytes(self) -> np.ndarray:
        if self._data is None:
            if self.buffer is not None:
                self._data = self.buffer.numpy()
            else:
                self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
            self._data.flags.writeable = False  # a transform must not change the cache
        return self._data

    def get(self, index: int) -> np.ndarray:
        """The decoded image `index` as `read_raw` gave it; `DataError` if it failed then."""
        if self.index.errors[index]:
            raise DataError(str(self.index.errors[index]))
        start = int(self.index.offsets[index])
        shape = tuple(int(s) for s in self.index.shapes[index] if s)
        dtype = np.dtype(str(self.index.dtypes[index]))
        chunk = self._bytes()[start : start + self.index.nbytes(index)]
        return chunk.view(dtype).reshape(shape)


class _Decode(Dataset):
    """(index, pixels or None, error or None) per file: the fill pass's work."""

    def __init__(
        self, paths: list[Path], max_pixels: int | None, dicom: DicomOptions | None = None
    ) -> None:
        self.paths, self.max_pixels, self.dicom = paths, max_pixels, dicom

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray | None, str | None]:
        try:
            return (
                index,
                np.ascontiguousarray(
                    read_raw(self.paths[index], None, self.max_pixels, self.dicom)
                ),
                None,
            )
        except DataError as err:
            return index, None, str(err)


def _as_is(item: object) -> object:
    return item


def _decode_all(paths: list[Path], max_pixels: int | None, workers: int, dicom=None):
    """Decoded images in order, `workers` processes decoding ahead."""
    # Its own generator: the loader's worker seed is not drawn from torch's global one, so
    # filling a cache leaves the seeded augmentation of the run exactly as without a cache.
    loader = DataLoader(
        _Decode(paths, max_pixels, dicom),
        batch_size=None,
        num_workers=workers,
        collate_fn=_as_is,
        generator=torch.Generator(),
        worker_init_fn=ignore_stop_signals,
    )
    yield from loader


def _fill(
    paths: list[Path], max_pixels: int | None, workers: int, write, key: str, dicom=None
) -> _Index:
    """Decode every file, hand its bytes to `write(offset, bytes)`; the index of what was written."""
    count = len(paths)
    offsets, shapes = np.zeros(count, np.int64), np.zeros((count, 3), np.int64)
    dtypes, errors = [""] * count, [""] * count
    sums = np.zeros(count, np.uint32)
    offset = 0
    for position, pixels, error in _decode_all(paths, max_pixels, workers, dicom):
        if error is not None:
            errors[position] = error
            continue
        offsets[position] = offset
        shapes[position, : pixels.ndim] = pixels.shape
        dtypes[position] = pixels.dtype.name
        data = memoryview(pixels).cast("B")
        sums[position] = zlib.crc32(data)
        write(offset, data)
        offset += pixels.nbytes
    return _Index(offsets, shapes, np.array(dtypes, str), np.array(errors, str), key, sums)


def build_memory_cache(
    paths: list[Path],
    max_pixels: int | None,
    workers: int = 0,
    ram_share: float = RAM_SHARE,
    dicom: DicomOptions | None = None,
) -> DecodedCache:
    """Decode `paths` into one shared-memory buffer; refuse when it would not fit."""
    estimate = estimated_bytes(paths)
    available = _available_memory()
    if estimate > ram_share * available:
        raise DataError(
            f"data.cache: memory needs about {estimate / 1e9:.1f} GB for {len(paths)} decoded "
            f"images, more than {ram_share:.0%} of the {available / 1e9:.1f} GB of available "
            "memory (and /dev/shm); use data.cache: disk"
        )
    held = {"buffer": torch.empty(max(estimate, 1), dtype=torch.uint8).share_memory_()}

    def keep(offset: int, data: memoryview) -> None:
        buffer = held["buffer"]  # [bytes]
        end = offset + len(data)
        if end > len(buffer):  # the headers said less than OpenCV decoded: grow
            bigger = torch.empty(max(end, len(buffer) * 3 // 2), dtype=torch.uint8)
            bigger = bigger.share_memory_()
            bigger[: len(buffer)] = buffer
            held["buffer"] = buffer = bigger
        buffer.numpy()[offset:end] = np.frombuffer(data, np.uint8)

    index = _fill(paths, max_pixels, workers, keep, "memory", dicom)
    return DecodedCache(index, held["buffer"], None)


def _available_memory() -> int:
    """MemAvailable (Linux), bounded by the free space of /dev/shm, where shared tensors live."""
    available = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    if Path("/dev/shm").is_dir():
        available = min(available, shutil.disk_usage("/dev/shm").free)
    return available


def open_disk_cache(path: Path, key: str, count: int) -> DecodedCache | None:
    """The cache at `path` if it is complete and made for `key`; None otherwise."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            handle.seek(size - _FOOTER)
            footer = handle.read(_FOOTER)
            if len(footer) != _FOOTER or footer[8:] != FORMAT:
                return None
            length = int.from_bytes(footer[:8], "little")
            if length <= 0 or length > size - _FOOTER:
                return None
            handle.seek(size - _FOOTER - length)
            index = _Index.from_bytes(handle.read(length))
    except (OSError, ValueError, KeyError, EOFError):
        return None
    data_end = size - _FOOTER - length
    ends = [int(index.offsets[i]) + index.nbytes(i) for i in range(len(index.offsets))]
    if index.key != key or len(index.offsets) != count or max(ends, default=0) > data_end:
        return None
    if len(index.sums) != count or not _pixels_intact(path, index):
        return None
    return DecodedCache(index, None, path)


def _pixels_intact(path: Path, index: _Index) -> bool:
    """Every image's bytes against the CRC-32 stored when it was written.

    The index and footer say nothing about the pixels between them: bytes zeroed or changed
    there (a bad sector, a stray write, a copy cut and padded) were trusted and trained on.
    One sequential read at setup, far cheaper than the decoding the cache saves.
    """
    data = np.memmap(path, dtype=np.uint8, mode="r")  # [bytes]
    for i in range(len(index.offsets)):
        if index.errors[i]:
            continue
        start = int(index.offsets[i])
        if zlib.crc32(data[start : start + index.nbytes(i)]) != int(index.sums[i]):
            return False
    return True


def disk_cache_path(
    paths: list[Path], max_pixels: int | None, cache_dir: Path, dicom: DicomOptions | None = None
) -> tuple[Path, str]:
    key = cache_key(paths, max_pixels, dicom)
    return cache_dir / f"{key}.vtcache", key


def build_disk_cache(
    paths: list[Path],
    max_pixels: int | None,
    cache_dir: Path,
    workers: int = 0,
    dicom: DicomOptions | None = None,
) -> DecodedCache:
    """Open the disk cache of `paths`, decoding them into it first if it is missing or damaged."""
    path, key = disk_cache_path(paths, max_pixels, cache_dir, dicom)
    cache = open_disk_cache(path, key, len(paths))
    if cache is not None:
        return cache
    if path.exists():
        warnings.warn(
            f"decoded-image cache {path} is incomplete or damaged; rebuilding it (its index,"
            " footer or an image's checksum did not match)",
            stacklevel=2,
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{key}-", suffix=".partial", dir=cache_dir)
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(handle, 0o666 & ~umask)  # as any written file (mkstemp makes it private)
    try:
        with os.fdopen(handle, "wb") as out:

            def write(offset: int, data: memoryview) -> None:
                out.write(data)

            index = _fill(paths, max_pixels, workers, write, key, dicom)
            table = index.to_bytes()
            out.write(table)
            out.write(len(table).to_bytes(8, "little") + FORMAT)
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, path)  # atomic: readers see no file or a whole one
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    # A file changed during the fill keeps the old key's name: the next run's key differs
    # and it decodes again, so stale pixels are never trusted twice.
    return DecodedCache(index, None, path)
