"""Reading `vittune prepare-data` shards (`data.format: litdata`) as files are read.

`OUT/vittune.json` gives the class names, `OUT/samples.csv` every image (split, index in its
shards, class indices, source path), so the data module sees the same `SplitSamples` as for
the source folder or CSV. The pixels come from `OUT/<split>/` through litdata:

- training iterates a `StreamingDataset` (litdata's chunk-then-item shuffle, seeded from
  `trainer.seed` and the epoch; under DDP litdata gives each rank its own chunks and, with
  its `drop_last`, the same number of items, so no rank waits for another);
- evaluation reads images by index (`ShardImages`), so the data module's
  `UnrepeatedDistributedSampler` scores every image exactly once under DDP, as for files.

Both go through `ItemDecoder`: the file's original bytes decoded by `read_raw`, the
recipe's transform, the target; a corrupt image is handled as `on_corrupt` says.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vittune.data.datasets import (
    CorruptLog,
    Sample,
    SplitSamples,
    encode_target,
    leave_out,
    model_input,
)
from vittune.data.decode import read_raw, to_float
from vittune.data.dicom import DicomOptions, options_from
from vittune.errors import DataError
from vittune.recipe.schema import DataConfig

SCHEMA_VERSION = 1
METADATA = "vittune.json"
MANIFEST = "samples.csv"
PREPARE_HINT = "write it with `vittune prepare-data RECIPE OUT` and set data.root: OUT"


def require_litdata() -> None:
    """litdata is optional: say how to get it, in one line, before anything uses it."""
    try:
        import litdata  # noqa: F401, PLC0415
    except ImportError:
        raise DataError(
            "data.format: litdata and prepare-data need the litdata package;"
            " install it with pip install 'vittune[stream]'"
        ) from None


def is_remote(root: str) -> bool:
    return "://" in root


def join(root: str, *parts: str) -> str:
    """`root/part/...` for a folder or an object-store URL."""
    return "/".join([str(root).rstrip("/"), *parts])


def _read_text(root: str, name: str) -> str:
    if not is_remote(root):
        path = Path(root) / name
        if not path.is_file():
            raise DataError(f"data.root {root} has no {name}; {PREPARE_HINT}")
        return path.read_text(encoding="utf-8")
    from litdata.streaming.downloader import get_downloader  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / name
        try:
            get_downloader(root, tmp, []).download_file(join(root, name), str(local))
            return local.read_text(encoding="utf-8")
        except Exception as err:  # every store raises its own errors
            raise DataError(
                f"cannot read {join(root, name)} ({type(err).__name__}); check the URL and"
                f" credentials, or {PREPARE_HINT}"
            ) from None


def read_metadata(root: str) -> dict:
    try:
        metadata = json.loads(_read_text(root, METADATA))
    except json.JSONDecodeError:
        raise DataError(f"{join(root, METADATA)} is not valid JSON; {PREPARE_HINT}") from None
    if metadata.get("vittune_litdata") != SCHEMA_VERSION:
        raise DataError(
            f"{join(root, METADATA)} is not from this vittune's prepare-data"
            f" (version {metadata.get('vittune_litdata')!r}); prepare the data again"
        )
    return metadata


def _check_matches(cfg: DataConfig, metadata: dict) -> None:
    """The recipe's labelling and split keys must be those the shards were written with."""
    source = metadata["source"]
    recorded = {
        "multi_label": metadata["multi_label"],
        "labelled": metadata["labelled"],
        "val_fraction": source["val_fraction"],
        "train_fraction": source["train_fraction"],
        "split_seed": source["split_seed"],
    }
    for key, value in recorded.items():
        if getattr(cfg, key) != value:
            raise DataError(
                f"the shards in {cfg.root} were prepared with data.{key}: {value}, the recipe says"
                f" {getattr(cfg, key)}; set data.{key}: {value} or prepare the data again"
            )


@lru_cache(maxsize=4)
def _manifest(root: str) -> dict[str, list[Sample]]:
    splits: dict[str, list[Sample]] = {}
    for row in csv.DictReader(io.StringIO(_read_text(root, MANIFEST))):
        labels = tuple(int(label) for label in row["labels"].split())
        splits.setdefault(row["split"], []).append(Sample(Path(row["path"]), labels))
    return splits


@lru_cache(maxsize=4)
def locations(root: str) -> dict[str, tuple[str, int]]:
    """source path -> (split, index in that split's shards)."""
    return {
        str(s.path): (split, i) for split, ss in _manifest(root).items() for i, s in enumerate(ss)
    }


def read_prepared(cfg: DataConfig) -> SplitSamples:
    """Classes and samples per split of prepared shards, as `scan_sources` gave them."""
    require_litdata()
    metadata = read_metadata(cfg.root)
    _check_matches(cfg, metadata)
    splits = {split: list(samples) for split, samples in _manifest(cfg.root).items()}
    sizes = {split: len(samples) for split, samples in splits.items()}
    if sizes != metadata["splits"]:
        raise DataError(
            f"{join(cfg.root, MANIFEST)} lists {sizes} images but {METADATA} says"
            f" {metadata['splits']}; the folder is incomplete, prepare the data again"
        )
    refused = {Path(p): reason for p, reason in metadata["left_out"].items()}
    return SplitSamples(classes=list(metadata["classes"]), splits=splits, refused=refused)


@dataclass
class ItemDecoder:
    """The one step from stored bytes to a model input: decode, transform, target.

    It does for an image in memory what `ImageDataset.__getitem__` does for a file, with the
    same decoding rules and limits (`read_raw`), the same targets, and the same
    handling of a corrupt image (None for `SkipCorrupt`, logged; or raised).
    """

    transform: Callable | None
    num_classes: int
    in_chans: int = 3
    intensity: str = "dtype"
    multi_label: bool = False
    on_corrupt: str = "skip"
    max_pixels: int | None = None
    corrupt_log: CorruptLog | None = None
    dicom: DicomOptions | None = None  # data.dicom_window / dicom_frame
    _warned: set[Path] = field(default_factory=set, repr=False)

    def __call__(
        self, data: bytes, name: str, labels: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        try:
            raw = read_raw(bytes(data), name, self.max_pixels, self.dicom)
        except DataError as err:
            leave_out(err, Path(name), self.on_corrupt, self.corrupt_log, self._warned)
            return None
        image = model_input(raw, self.transform, self.in_chans, self.intensity)
        return image, encode_target(labels, self.num_classes, self.multi_label)

    def set_random_state(self, *generators: object) -> None:
        """`seed_augmentation` seeds a dataset's `transform`: pass the generators on."""
        if self.transform is not None:
            self.transform.set_random_state(*generators)


def _record(item: dict) -> dict:
    return json.loads(item["record"])


@dataclass
class DecodeItem:
    """A stored item `{image, record}` through an `ItemDecoder`, as litdata calls a
    dataset's `transform`; `seed_worker` seeds that same attribute (per worker and rank)."""

    decoder: ItemDecoder

    def __call__(self, item: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        record = _record(item)
        return self.decoder(item["image"], record["path"], tuple(record["labels"]))

    def set_random_state(self, *generators: object) -> None:
        self.decoder.set_random_state(*generators)


def streamed_images(root: str, split: str, decoder: ItemDecoder, seed: int) -> Dataset:
    """The shuffled training stream of `root/split` (litdata splits it between DDP ranks)."""
    from litdata import StreamingDataset  # noqa: PLC0415 (litdata only for this format)

    dataset = StreamingDataset(join(root, split), shuffle=True, seed=seed)
    dataset.transform = DecodeItem(decoder)  # one callable, not litdata's list of them
    return dataset


class ShardImages(Dataset):
    """Images by index from the shards: each sample is found by its source path, so any
    list of prepared samples (a split, or the split that `evaluate` picked) can be served."""

    def __init__(self, root: str, samples: list[Sample], decoder: ItemDecoder) -> None:
        where = locations(root)
        missing = [s.path for s in samples if str(s.path) not in where]
        if missing:
            raise DataError(f"{missing[0]} is not in the shards of {root}; prepare the data again")
        self.root = root
        self.samples = samples
        self.places = [where[str(s.path)] for s in samples]
        self.transform = decoder  # seed_worker seeds a dataset's `transform`
        self._streams: dict[str, Dataset] = {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        item, path = self._item(index)
        return self.transform(item["image"], path, self.samples[index].labels)

    def load(self, index: int) -> np.ndarray:
        """float32 [H, W, in_chans] in [0, 1], as `ImageDataset.load` gives a file's pixels."""
        item, path = self._item(index)
        raw = read_raw(bytes(item["image"]), path, self.transform.max_pixels, self.transform.dicom)
        return to_float(raw, self.transform.in_chans, self.transform.intensity)

    def _item(self, index: int) -> tuple[dict, str]:
        split, position = self.places[index]
        if split not in self._streams:  # opened in the process that reads (a worker)
            from litdata import StreamingDataset  # noqa: PLC0415

            self._streams[split] = StreamingDataset(join(self.root, split))
        item = self._streams[split][position]
        sample, record = self.samples[index], _record(item)
        if record["path"] != str(sample.path):
            raise DataError(
                f"{join(self.root, split)} item {position} is {record['path']}, not {sample.path}:"
                " the shards do not match samples.csv; prepare the data again"
            )
        return item, record["path"]


def shard_dataset(
    cfg: DataConfig,
    samples: list[Sample],
    split: str,
    train: bool,
    transform: Callable | None,
    num_classes: int,
    in_chans: int,
    corrupt_log: CorruptLog | None,
) -> Dataset:
    """`split` of the shards under `cfg.root`: the training stream, or the images by index."""
    decoder = ItemDecoder(
        transform,
        num_classes=num_classes,
        in_chans=in_chans,
        intensity=cfg.intensity,
        multi_label=cfg.multi_label,
        on_corrupt=cfg.on_corrupt,
        max_pixels=cfg.max_image_pixels,
        corrupt_log=corrupt_log,
        dicom=options_from(cfg),
    )
    if not train:
        return ShardImages(cfg.root, samples, decoder)
    # `seed_everything(trainer.seed)` leaves the seed here, in every DDP process alike: the
    # ranks must shuffle with one seed to share the chunks out without overlap.
    return streamed_images(cfg.root, split, decoder, int(os.environ.get("PL_GLOBAL_SEED", 0)))


def stream_loader(dataset: Dataset, batch_size: int, num_workers: int, **kwargs: object) -> object:
    """litdata's loader for the training stream: it tells the dataset the epoch (a new
    shuffle each epoch), the batch size and worker count (its length per rank). Workers are
    not persistent, so each epoch's workers see that epoch."""
    from litdata import StreamingDataLoader  # noqa: PLC0415

    return StreamingDataLoader(
        dataset, batch_size=batch_size, num_workers=num_workers, persistent_workers=False, **kwargs
    )
