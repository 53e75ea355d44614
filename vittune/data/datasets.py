"""Finding images and labels (image folders, CSV manifests) and reading them as samples."""

from __future__ import annotations

import csv
import os
import random
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from vittune.data.cache import DecodedCache
from vittune.data.decode import IMAGE_SUFFIXES, check_image, is_image_file, read_raw, to_float
from vittune.data.dicom import DicomOptions
from vittune.data.transforms import IntegerNormalise
from vittune.errors import DataError
from vittune.recipe.schema import DEFAULT_MAX_IMAGE_PIXELS

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    path: Path
    labels: tuple[int, ...]  # empty for unlabelled images; several for multi-label
    group: str | None = None  # patient/study (data.group_column / group_pattern)
    frame: int | None = None  # the frame of a multi-frame DICOM file (data.dicom_frame: all)


@dataclass
class SplitSamples:
    """Everything the data module needs: class names, samples per split, and files left out."""

    classes: list[str]
    splits: dict[str, list[Sample]] = field(default_factory=dict)
    refused: dict[Path, str] = field(default_factory=dict)  # path -> why it cannot be used
    # training images that data.train_fraction leaves out (splits.csv lists them as `unused`)
    unused: list[Sample] = field(default_factory=list)

    @classmethod
    def classes_only(cls, classes: list[str]) -> SplitSamples:
        """Empty train and val splits: for building a model where no images are read
        (inspect without the data, inference on files given later, in-memory benchmarks)."""
        return cls(classes=list(classes), splits={"train": [], "val": []})


def drop_unreadable(
    found: SplitSamples, max_pixels: int | None, on_corrupt: str = "skip"
) -> SplitSamples:
    """Check every file's header and take the unusable ones out of every split.

    Runs before splits are made or counted, so a corrupt file takes no validation slot and
    is in no split size. Only headers are read (non-images, truncated headers and
    decompression bombs are caught); pixel data that fails later is dropped by `SkipCorrupt`.
    """
    readable, first_refusal = set(), {}  # class index -> one reason its files failed
    for split, entries in found.splits.items():
        kept, reasons = [], []
        for sample in entries:
            try:
                check_image(sample.path, max_pixels)
            except DataError as err:
                if on_corrupt == "error":
                    raise DataError(f"{err} (data.on_corrupt: error)") from None
                found.refused[sample.path] = str(err)
                reasons.append(str(err))
                for label in sample.labels:
                    first_refusal.setdefault(label, str(err))
                continue
            kept.append(sample)
            readable.update(sample.labels)
        if entries and not kept:
            raise DataError(f"no image of the {split} split can be read; the first: {reasons[0]}")
        found.splits[split] = kept
    # a class whose every file is unreadable would train as a class with no images
    for label, reason in first_refusal.items():
        if label not in readable:
            raise DataError(
                f"class {found.classes[label]!r} has no readable image (e.g. {reason});"
                " replace its files or remove the class"
            )
    return found


def _images_under(folder: Path, recursive: bool = False) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in folder.glob(pattern) if p.is_file() and is_image_file(p))


def _class_folders(root: Path) -> dict[str, list[Path]]:
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(
            f"no class sub-folders in {root}; expected {root}/<class>/<image> (or set data.labelled: false)"
        )
    found = {}
    for folder in folders:
        images = _images_under(folder, recursive=True)
        if not images:
            raise DataError(
                f"class folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}); add images or remove the folder"
            )
        found[folder.name] = images
    return found


def scan_folder(root: str | Path, labelled: bool = True) -> SplitSamples:
    """Read `<root>/<class>/*` or `<root>/{train,val,test}/<class>/*`."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"data.root {root} does not exist or is not a folder; fix the path in the recipe, or give it as data.root=PATH"
        )
    if not labelled:
        images = _images_under(root, recursive=True)
        if not images:
            raise DataError(
                f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}; check data.root"
            )
        return SplitSamples(classes=[], splits={"train": [Sample(p, ()) for p in images]})
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()}
    if "train" not in split_dirs:
        per_class = _class_folders(root)
        classes = list(per_class)
        samples = [Sample(p, (i,)) for i, name in enumerate(classes) for p in per_class[name]]
        return SplitSamples(classes=classes, splits={"train": samples})
    train = _class_folders(split_dirs["train"])
    classes = list(train)
    result = SplitSamples(classes=classes)
    for split, folder in split_dirs.items():
        per_class = train if split == "train" else _class_folders(folder)
        unknown = sorted(set(per_class) - set(classes))
        if unknown:
            raise DataError(
                f"{folder} has classes {unknown} that train/ does not have; add them to train/ or remove them"
            )
        result.splits[split] = [
            Sample(p, (classes.index(name),)) for name, paths in per_class.items() for p in paths
        ]
    return result


def scan_csv(
    csv_path: str | Path,
    multi_label: bool = False,
    labelled: bool = True,
    group_column: str | None = None,
) -> SplitSamples:
    """Read a manifest `path,label[,split][,<group_column>]`; paths are relative to the CSV's
    folder."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(
            f"data.csv {csv_path} does not exist; fix the path in the recipe, or give it as data.csv=PATH"
        )
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:  # Excel writes a BOM
        reader = csv.DictReader(handle)
        columns = set(reader.fieldnames or [])
        needed = ({"path", "label"} if labelled else {"path"}) | (
            {group_column} if group_column else set()
        )
        if not needed <= columns:
            raise DataError(
                f"{csv_path} needs a header with columns {sorted(needed)} (optional: split); found {sorted(columns)}"
            )
        rows = list(reader)
    if not rows:
        raise DataError(f"{csv_path} lists no images; add rows path,label[,split]")
    raw: dict[str, list[tuple[Path, list[str], str | None]]] = defaultdict(list)
    for line, row in enumerate(rows, start=2):
        image = csv_path.parent / (row["path"] or "").strip()
        if not row["path"] or not image.is_file():
            raise DataError(
                f"{csv_path} line {line}: image {row['path']!r} not found (paths are relative to the CSV); fix or remove the row"
            )
        split = (row.get("split") or "train").strip().lower()
        if split not in SPLITS:
            raise DataError(
                f"{csv_path} line {line}: split {split!r} must be one of {', '.join(SPLITS)}"
            )
        names = (
            []
            if not labelled
            else [n.strip() for n in (row["label"] or "").split(";" if multi_label else "\0")]
        )
        names = [n for n in names if n]
        if labelled and not names:
            raise DataError(
                f"{csv_path} line {line}: empty label for {row['path']!r}; give every image a label"
            )
        group = (row[group_column] or "").strip() if group_column else None
        if group_column and not group:
            raise DataError(
                f"{csv_path} line {line}: empty {group_column!r} for {row['path']!r}; give every image its group"
            )
        raw[split].append((image, names, group))
    if "train" not in raw:
        raise DataError(
            f"{csv_path} has no rows in the train split; mark some rows split=train or drop the split column"
        )
    classes = sorted({n for _, names, _ in raw["train"] for n in names})
    result = SplitSamples(classes=classes)
    for split, entries in raw.items():
        unknown = sorted({n for _, names, _ in entries for n in names} - set(classes))
        if unknown:
            raise DataError(
                f"{csv_path}: labels {unknown} in split {split!r} never appear in train; fix the labels or add train rows"
            )
        result.splits[split] = [
            Sample(p, tuple(classes.index(n) for n in names), group) for p, names, group in entries
        ]
    return result


def stratified_split(
    samples: list[Sample], val_fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Hold out `val_fraction` of each class (by first label), seeded; classes of one image stay in train."""
    by_class: dict[int, list[Sample]] = defaultdict(list)
    for sample in samples:
        by_class[sample.labels[0] if sample.labels else -1].append(sample)
    rng = random.Random(seed)
    train, val = [], []
    for label in sorted(by_class):
        group = list(by_class[label])
        rng.shuffle(group)
        n_val = (
            min(len(group) - 1, max(1, round(len(group) * val_fraction))) if len(group) > 1 else 0
        )
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return train, val


class CorruptLog:
    """Files that failed to decode, collected from every DataLoader worker process.

    Workers are separate processes that share nothing with the main one, so each failure is
    appended as one line to a file: `O_APPEND` writes of a short line are atomic, so lines
    from several workers (and DDP ranks) never interleave.
    """

    def __init__(self, path: Path) -> None:
        self.path = path

    def add(self, image: Path, reason: str) -> None:
        line = f"{image}\t{' '.join(reason.split())}\n".encode()
        handle = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(handle, line)
        finally:
            os.close(handle)

    def read(self) -> dict[Path, str]:
        """path -> reason, each file once (a file fails again in every epoch)."""
        if not self.path.is_file():
            return {}
        lines = self.path.read_text().splitlines()
        return {Path(p): r for p, _, r in (line.partition("\t") for line in lines)}


def leave_out(
    err: DataError,
    path: Path,
    on_corrupt: str,
    corrupt_log: CorruptLog | None,
    warned: set[Path],
) -> None:
    """An image that failed to decode: raised under `data.on_corrupt: error`; otherwise left
    out of its batch (the caller returns None for `SkipCorrupt`), logged for the run's summary
    and warned about once per file in this process (a file fails again every epoch)."""
    if on_corrupt == "error":
        raise err
    if corrupt_log is not None:
        corrupt_log.add(path, str(err))
    if path not in warned:
        warned.add(path)
        warnings.warn(f"{err} (left out of its batch)", stacklevel=3)


def encode_target(labels: tuple[int, ...], num_classes: int, multi_label: bool) -> torch.Tensor:
    """A class index (-1 when unlabelled), or a multi-hot vector for multi-label data."""
    if multi_label:
        target = torch.zeros(num_classes)
        target[list(labels)] = 1.0
        return target
    return torch.tensor(labels[0] if labels else -1)


def model_input(
    raw: np.ndarray, transform: Callable | None, in_chans: int, intensity: str
) -> torch.Tensor:
    """Decoded pixels as stored (`read_raw`) -> the [C, H, W] tensor the model takes: the one
    step shared by files, the decoded cache and litdata shards."""
    if hasattr(transform, "from_raw"):  # a preset: geometry on the integers first
        return transform.from_raw(raw, in_chans, intensity)["image"]
    pixels = to_float(raw, in_chans, intensity)
    if transform is None:
        return torch.from_numpy(pixels).permute(2, 0, 1)
    return transform(image=pixels)["image"]


class ImageDataset(Dataset):
    """Decodes one sample per index; a corrupt file gives `None` (for `SkipCorrupt`) or raises."""

    def __init__(
        self,
        samples: list[Sample],
        num_classes: int,
        transform: Callable | None,
        in_chans: int = 3,
        intensity: str = "dtype",
        multi_label: bool = False,
        on_corrupt: str = "skip",
        max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        corrupt_log: CorruptLog | None = None,
        cache: DecodedCache | None = None,
        dicom: DicomOptions | None = None,
    ) -> None:
        self.samples = samples
        self.num_classes = num_classes
        self.transform = transform
        self.in_chans = in_chans
        self.intensity = intensity
        self.multi_label = multi_label
        self.on_corrupt = on_corrupt
        self.max_pixels = max_pixels
        self.corrupt_log = corrupt_log
        self.cache = cache  # the samples' decoded pixels, in the same order (data.cache)
        self.dicom = dicom  # data.dicom_window / dicom_frame
        self._warned: set[Path] = set()  # per process: one warning per file, not per epoch

    def __len__(self) -> int:
        return len(self.samples)

    def target(self, sample: Sample) -> torch.Tensor:
        return encode_target(sample.labels, self.num_classes, self.multi_label)

    def load_raw(self, index: int) -> np.ndarray:
        """The decoded pixels as stored (`read_raw`): integers for integer files."""
        if self.cache is not None:
            return self.cache.get(index)
        sample = self.samples[index]
        dicom = self.dicom
        if sample.frame is not None:  # one frame of a multi-frame file (data.dicom_frame: all)
            dicom = replace(dicom or DicomOptions(), frame=sample.frame)
        return read_raw(sample.path, max_pixels=self.max_pixels, dicom=dicom)

    def load(self, index: int) -> np.ndarray:
        """float32 [H, W, in_chans] in [0, 1], as `read_image` gives it."""
        return to_float(self.load_raw(index), self.in_chans, self.intensity)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        sample = self.samples[index]
        try:
            raw = self.load_raw(index)
        except DataError as err:
            leave_out(err, sample.path, self.on_corrupt, self.corrupt_log, self._warned)
            return None
        image = model_input(raw, self.transform, self.in_chans, self.intensity)
        return image, self.target(sample)


class SkipCorrupt:
    """DataLoader `collate_fn`: leave out the samples that failed to decode, collate the rest.

    The batch gets smaller instead of taking a copy of another image, so a corrupt
    validation image is not replaced by a duplicate that would be scored twice.

    Training workers may deliver integer images (`IntegerFirst.integers`), and a folder can
    hold 8- and 16-bit files, or files that still take the float path (float TIFFs, int16):
    `common_images` gives every image of a batch one representation first.
    """

    def __init__(self, even: bool = False, normalise: IntegerNormalise | None = None) -> None:
        self.even = even  # mixup/cutmix pair images within a batch: keep its size even
        self.normalise = normalise  # for integer images in a batch with float ones

    def __call__(self, items: list) -> object:
        kept = [item for item in items if item is not None]
        if self.even and len(kept) % 2:
            kept = kept[:-1]
        if not kept:
            raise DataError(
                f"none of the {len(items)} images of a batch could be decoded; remove the corrupt "
                "files named in the warnings, or set data.on_corrupt: error to stop at the first"
            )
        return default_collate(common_images(kept, self.normalise))


def common_images(items: list, normalise: IntegerNormalise | None) -> list:
    """(image, target) items whose images share one dtype, each meaning what it meant.

    With `data.intensity: dtype` an 8-bit value v means v / 255 and a 16-bit one v / 65535,
    so a mixed batch cannot just be cast: uint8 images become uint16 as v * 257 (exact, since
    65535 = 255 * 257); integer images next to float (already normalised) ones are normalised
    here, as the device would have done.
    """
    dtypes = {item[0].dtype for item in items}
    if len(dtypes) < 2:
        return items
    if all(not d.is_floating_point for d in dtypes):
        if dtypes != {torch.uint8, torch.uint16}:
            raise DataError(f"cannot batch images of types {sorted(map(str, dtypes))}")
        return [(_as_uint16(item[0]), *item[1:]) for item in items]
    if normalise is None:
        raise DataError("a batch mixes integer and float images and nothing normalises them")
    return [
        item if item[0].is_floating_point() else (normalise(item[0][None])[0], *item[1:])
        for item in items
    ]


def _as_uint16(image: torch.Tensor) -> torch.Tensor:
    return image.to(torch.uint16) * 257 if image.dtype == torch.uint8 else image
