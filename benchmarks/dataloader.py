"""Images per second that decoding + augmentation delivers, vittune against torchvision v2.

Both sides read the same generated files and do the same work per image: decode, random
resized crop to 224 (scale 0.5-1, as vittune's `light` preset), horizontal flip with p=0.5,
conversion to float, per-channel normalisation, a float tensor [C, 224, 224], batched by a
DataLoader (batch 32) with 1..N worker processes. Where the float conversion and
normalisation run differs: in the worker for torchvision (its standard pipeline), on the
whole batch in the main process for vittune (standing in for the device; see below).

- **torchvision**: `torchvision.io.decode_image` (libjpeg-turbo, libpng) and a `v2.Compose`
  of `RandomResizedCrop(224, scale=(0.5, 1))`, `RandomHorizontalFlip()`,
  `ToDtype(float32, scale=True)`, `Normalize`, on uint8 / uint16 tensors: what the torchvision
  docs recommend (its defaults, so antialiased resizing).
- **vittune**: `ImageDataset` with the `light` preset, exactly as the data module builds it
  for training (header check against `data.max_image_pixels`, `read_raw`,
  `IntegerFirst.from_raw` with `integers` on): workers send the cropped, flipped uint8 /
  uint16 images, and the normalisation the task does on the device
  (`IntegerNormalise`, in `on_after_batch_transfer`) runs here on the CPU in the measuring
  loop, in the main process, so its cost is counted and nothing is hidden on a GPU.
- **vittune, normalised in the worker**: the same pipeline sending float32 batches, as
  training did before the integer hand-over (and as the float path still does).
- **vittune float (before)**: the pipeline before the integer path: OpenCV decodes every
  file, the whole image is scaled to float32, then the same albumentations steps run.

Files: JPEGs of 256-500 px a side (smooth shapes, edges and noise, quality 90, RGB, in_chans
3), 16-bit grey PNGs of 256-512 px (in_chans 1) and the same grey pixels as 12-bit DICOM
(uncompressed, with a VOI window; torchvision cannot read DICOM, so only vittune's rows). A
second table times decoding alone (`read_raw`, one process): PNG 16-bit beside DICOM
uncompressed, RLE and JPEG 2000 lossless of the same pixels. Each worker count gets a fresh loader with
persistent workers, one untimed pass, then `--passes` timed ones; pipelines alternate within
each repeat and the table shows medians. CPU time is that of the main process plus every
worker (read from /proc), so `images per CPU-s` is the per-core rate, the number that other
jobs on a shared machine disturb least; wall-clock images/s is shown beside it. Workers 0 runs
everything in this process: decode + augment + collate without the cost of sending float32
batches from worker processes through shared memory, which is the same for both sides.

    python benchmarks/dataloader.py                         # workers 0 1 2 (a 2-core machine)
    python benchmarks/dataloader.py --workers 1 2 4 8 16    # a bigger machine
    python benchmarks/dataloader.py --write                 # ... and update RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from results_md import RESULTS, machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2

import vittune.data.decode as decode
from vittune.data.datasets import ImageDataset, Sample
from vittune.data.decode import to_float
from vittune.data.transforms import IntegerNormalise, build_train_transform
from vittune.recipe.schema import AugmentConfig

SECTION = "## Data loading: decode + augment (vittune vs torchvision v2)"
SIZE, BATCH = 224, 32
KINDS = {  # files -> (in_chans, mean, std)
    "JPEG RGB 256-500 px": (3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "PNG 16-bit grey 256-512 px": (1, (0.5,), (0.25,)),
    "DICOM 12-bit grey 256-512 px": (1, (0.5,), (0.25,)),
}
DECODE_SECTION = "## Decoding alone: PNG 16-bit and DICOM (read_raw, one process)"
PIPELINES = (
    "torchvision",
    "vittune float (before)",
    "vittune, normalised in the worker",
    "vittune",
)


def natural_image(rng: np.random.Generator, height: int, width: int, channels: int) -> np.ndarray:
    """float [H, W, C] in [0, 1]: smooth gradients, a few filled shapes (edges), fine noise."""
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.zeros((height, width, channels), np.float32)
    for c in range(channels):
        for _ in range(3):
            fy, fx, phase = rng.uniform(0.002, 0.03, 2).tolist() + [rng.uniform(0, 6.3)]
            image[:, :, c] += np.sin(rows * fy * 6.3 + cols * fx * 6.3 + phase) / 6
    for _ in range(6):
        centre = rng.uniform(0, 1, 2) * (width, height)
        axes = rng.uniform(10, min(height, width) / 3, 2)
        colour = rng.uniform(-0.3, 0.3, channels).tolist()
        cv2.ellipse(image, tuple(map(int, centre)), tuple(map(int, axes)), rng.uniform(0, 180),
                    0, 360, colour, -1)  # fmt: skip
    image = cv2.GaussianBlur(image, (0, 0), 1.0).reshape(height, width, channels)
    return np.clip(image + 0.5 + rng.normal(0, 0.03, image.shape), 0, 1)


def make_files(root: Path, count: int, seed: int = 0) -> dict[str, list[Path]]:
    rng = np.random.default_rng(seed)
    files: dict[str, list[Path]] = {kind: [] for kind in KINDS}
    files.update({"DICOM RLE": [], "DICOM JPEG 2000 lossless": []})
    jpeg_kind, png_kind, dicom_kind = KINDS
    for k in range(count):
        height, width = rng.integers(256, 501, 2)
        rgb = np.round(natural_image(rng, height, width, 3) * 255).astype(np.uint8)
        path = root / f"photo_{k:04d}.jpg"
        cv2.imwrite(str(path), rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
        files[jpeg_kind].append(path)
        height, width = rng.integers(256, 513, 2)
        grey = np.round(natural_image(rng, height, width, 1)[:, :, 0] * 65535).astype(np.uint16)
        path = root / f"scan_{k:04d}.png"
        cv2.imwrite(str(path), grey)
        files[png_kind].append(path)
        stored = (grey >> 4).astype(np.uint16)  # 12 bits, as CR/DX detectors deliver
        for kind, syntax in [
            (dicom_kind, None),
            ("DICOM RLE", "rle"),
            ("DICOM JPEG 2000 lossless", "j2k"),
        ]:
            files[kind].append(write_dicom(root / f"scan_{k:04d}_{syntax}.dcm", stored, syntax))
    return files


def write_dicom(path: Path, stored: np.ndarray, syntax: str | None) -> Path:
    """A 12-bit MONOCHROME2 DICOM with a window, uncompressed or compressed by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import (
        ExplicitVRLittleEndian,
        JPEG2000Lossless,
        RLELossless,
        SecondaryCaptureImageStorage,
        generate_uid,
    )

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.WindowCenter, ds.WindowWidth = 2048, 4096
    ds.PixelData = stored.tobytes()
    if syntax is not None:
        ds.compress({"rle": RLELossless, "j2k": JPEG2000Lossless}[syntax])
    ds.save_as(path, enforce_file_format=True)
    return path


def decode_table(files: dict[str, list[Path]], repeats: int) -> str:
    """Images per CPU second of `read_raw` alone (one process; CPU time, which other jobs on
    a shared machine disturb less than the wall clock), and megapixels per CPU second."""
    lines = [
        "| files | images per CPU-s | CPU ms per image | megapixels per CPU-s |",
        "|---|--:|--:|--:|",
    ]
    for kind in ["PNG 16-bit grey 256-512 px", "DICOM 12-bit grey 256-512 px", "DICOM RLE",
                 "DICOM JPEG 2000 lossless"]:  # fmt: skip
        seconds, pixels = [], 0
        for _ in range(repeats + 1):  # the first pass warms the page cache and the libraries
            start, pixels = time.process_time(), 0
            for path in files[kind]:
                pixels += decode.read_raw(path).size
            seconds.append(time.process_time() - start)
        best = statistics.median(seconds[1:])
        count = len(files[kind])
        lines.append(
            f"| {kind} | {count / best:.0f} | {1000 * best / count:.2f} | {pixels / best / 1e6:.0f} |"
        )
    return "\n".join(lines)


class TorchvisionFiles(Dataset):
    def __init__(self, paths: list[Path], in_chans: int, mean: tuple, std: tuple) -> None:
        self.paths = paths
        self.mode = ImageReadMode.RGB if in_chans == 3 else ImageReadMode.UNCHANGED
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(SIZE, scale=(0.5, 1.0)),
                v2.RandomHorizontalFlip(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode_image(read_file(str(self.paths[index])), mode=self.mode)  # [C, H, W]
        return self.transform(image), torch.tensor(0)


class FloatBefore(ImageDataset):
    """vittune's path before the integer pipeline: OpenCV decodes, the whole image becomes
    float32, then the albumentations steps run on it."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        jpeg, decode.simplejpeg = decode.simplejpeg, None
        try:
            pixels = to_float(self.load_raw(index), self.in_chans, self.intensity)
        finally:
            decode.simplejpeg = jpeg
        return self.transform(image=pixels)["image"], self.target(self.samples[index])


def dataset(pipeline: str, paths: list[Path], in_chans: int, mean: tuple, std: tuple) -> Dataset:
    if pipeline == "torchvision":
        return TorchvisionFiles(paths, in_chans, mean, std)
    transform = build_train_transform(AugmentConfig(preset="light"), SIZE, mean, std)
    transform.integers = pipeline == "vittune"  # as the data module sets it for training
    kind = FloatBefore if pipeline == "vittune float (before)" else ImageDataset
    return kind([Sample(p, (0,)) for p in paths], 1, transform, in_chans=in_chans)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of this process and of `pids` (DataLoader workers)."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def measure(
    data: Dataset, workers: int, passes: int, on_batch: IntegerNormalise | None = None
) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over `passes` epochs after a warm one;
    `on_batch` runs on every batch in this process (vittune's device-side normalisation)."""
    loader = DataLoader(
        data,
        batch_size=BATCH,
        num_workers=workers,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers else None,
    )
    for batch, _ in loader:  # start the workers, warm the page cache and the libraries
        if on_batch is not None:
            on_batch(batch)
    pids = [w.pid for w in loader._iterator._workers] if workers else []  # noqa: SLF001
    wall, cpu = time.perf_counter(), cpu_seconds(pids)
    images = 0
    for _ in range(passes):
        for batch, _ in loader:
            if on_batch is not None:
                batch = on_batch(batch)
            images += batch.shape[0]
    wall, cpu = time.perf_counter() - wall, cpu_seconds(pids) - cpu
    del loader
    return images / wall, images / cpu


def table(results: dict, workers: list[int]) -> str:
    cores = os.cpu_count() or 1
    lines = [
        "| files | pipeline | workers | images/s (wall) | images/s per worker | images per CPU-s"
        " | vs torchvision per CPU-s |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    for kind in KINDS:
        for pipeline in PIPELINES:
            for count in workers:
                if (kind, pipeline, count) not in results:
                    continue
                wall = statistics.median(r[0] for r in results[kind, pipeline, count])
                cpu = statistics.median(r[1] for r in results[kind, pipeline, count])
                baseline = results.get((kind, "torchvision", count))
                base = statistics.median(r[1] for r in baseline) if baseline else None
                ratio = "" if pipeline == "torchvision" or base is None else f"{cpu / base:.2f}x"
                lines.append(
                    f"| {kind} | {pipeline} | {count or '0 (in-process)'} | {wall:.0f}"
                    f" | {wall / max(1, min(count, cores)):.0f}"
                    f" | {cpu:.0f} | {ratio} |"
                )
    return "\n".join(lines)


def write_decode(args: argparse.Namespace, decoding: str) -> None:
    """The decoding table's section of RESULTS.md."""
    flags = f"--images {args.images} --repeats {args.repeats}"
    flags += " --decode-only" if args.decode_only else ""
    write_section(
        DECODE_SECTION,
        f"{DECODE_SECTION}\n\nMachine: {machine()}; load average {os.getloadavg()[0]:.1f} at"
        f" the end.\nDate: {time.strftime('%Y-%m-%d')}. Command: `python"
        f" benchmarks/dataloader.py {flags} --write`.\n\nThe same grey pixels (256-512 px a"
        " side) as a 16-bit PNG and as 12-bit DICOM; DICOM through pydicom (modality LUT, VOI"
        " window, to uint16), RLE decoded by pydicom, JPEG 2000 by pylibjpeg-openjpeg. Median"
        f" of {args.repeats} timed passes after a warm one.\n\n{decoding}",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, os.cpu_count() or 1])
    parser.add_argument("--images", type=int, default=256, help="files of each kind")
    parser.add_argument("--passes", type=int, default=2, help="timed epochs per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    parser.add_argument("--decode-only", action="store_true", help="only the decoding table")
    args = parser.parse_args()
    workers = sorted(set(args.workers))
    warnings.filterwarnings("ignore")
    cv2.setNumThreads(1)  # each worker is one core's worth of work, on both sides
    torch.set_num_threads(1)
    started = time.perf_counter(), time.process_time()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="vittune-bench-") as folder:
        files = make_files(Path(folder), args.images)
        decoding = decode_table(files, args.repeats)
        print(decoding)
        if args.decode_only:
            if args.write:
                write_decode(args, decoding)
            return
        for _ in range(args.repeats):
            for kind, (in_chans, mean, std) in KINDS.items():
                for count in workers:
                    for pipeline in PIPELINES:
                        if kind.startswith("DICOM") and pipeline == "torchvision":
                            continue  # torchvision has no DICOM reader
                        data = dataset(pipeline, files[kind], in_chans, mean, std)
                        device = IntegerNormalise(mean, std) if pipeline == "vittune" else None
                        results.setdefault((kind, pipeline, count), []).append(
                            measure(data, count, args.passes, device)
                        )
    text = table(results, workers)
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    load = os.getloadavg()[0]
    print(f"\n{text}\n\n{wall:.0f} s wall ({cpu:.0f} s CPU in the main process); load {load:.1f}")
    if args.write:
        flags = f"--workers {' '.join(map(str, workers))} --images {args.images}"
        flags += f" --passes {args.passes} --repeats {args.repeats}"
        write_section(
            SECTION,
            f"{SECTION}\n\nMachine: {machine()}; load average {load:.1f} at the end.\n"
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `python benchmarks/dataloader.py"
            f" {flags}`.\n\nSame files, same operations (decode, random resized crop to 224 at"
            " scale 0.5-1, flip, float, normalise), batch 32, persistent workers, medians over"
            " repeats. `images per CPU-s` counts the main process and every worker: the per-core"
            " rate. vittune uses the `light` preset; its workers send uint8 / uint16 images and"
            " the normalisation the task does on the device runs on the CPU in the main process,"
            f" counted.\n\n{text}",
        )
        write_decode(args, decoding)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
