"""The Lightning data module: scans the sources once, splits, and serves loaders."""

from __future__ import annotations

import tempfile
import uuid
from collections import Counter
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, get_worker_info

from vittune.data.builtin import BUILTIN
from vittune.data.cache import (
    DecodedCache,
    build_disk_cache,
    build_memory_cache,
    default_cache_dir,
)
from vittune.data.datasets import (
    CorruptLog,
    ImageDataset,
    SkipCorrupt,
    SplitSamples,
    drop_unreadable,
    scan_csv,
    scan_folder,
    stratified_split,
)
from vittune.data.dicom import options_from
from vittune.data.duplicates import remove_duplicates
from vittune.data.frames import expand_frames
from vittune.data.groups import apply_splits_file, assign_pattern_groups, carve, check_overlap
from vittune.data.transforms import (
    IntegerFirst,
    IntegerNormalise,
    build_eval_transform,
    build_train_transform,
    seed_augmentation,
)
from vittune.data.workers import ignore_stop_signals
from vittune.errors import DataError
from vittune.recipe.schema import AugmentConfig, DataConfig


def scan_readable(cfg: DataConfig) -> SplitSamples:
    """The configured source's samples as it splits them (folders or a CSV's split column),
    with unreadable files left out; no validation split is made up here."""
    if cfg.format == "litdata":  # shards of `vittune prepare-data`, split when written
        return scan_sources(cfg)
    if cfg.builtin:
        found = scan_folder(BUILTIN[cfg.builtin](), labelled=cfg.labelled)
    elif cfg.csv:
        found = scan_csv(cfg.csv, cfg.multi_label, cfg.labelled, cfg.group_column)
    else:
        found = scan_folder(cfg.root, labelled=cfg.labelled)
        if cfg.group_pattern:
            assign_pattern_groups(found, cfg.root, cfg.group_pattern)
    found = remove_duplicates(found, cfg.allow_duplicates)  # before anything is split or read
    found = drop_unreadable(found, cfg.max_image_pixels, cfg.on_corrupt)
    return expand_frames(found) if cfg.dicom_frame == "all" else found


def scan_sources(cfg: DataConfig) -> SplitSamples:
    """Find samples from the one configured source, leave out unreadable files, then make sure
    a validation split exists (so the split is that of the same data without those files)."""
    if cfg.format == "litdata":
        from vittune.data.streaming import read_prepared  # noqa: PLC0415 (needs litdata)

        return read_prepared(cfg)
    found = scan_readable(cfg)
    # frames of one file share a group (data.dicom_frame: all): split by group then too
    grouped = bool(cfg.group_column or cfg.group_pattern) or cfg.dicom_frame == "all"
    if cfg.splits_from:
        apply_splits_file(found, cfg.splits_from)
    elif grouped:
        check_overlap(found, cfg.allow_group_overlap)
    missing = "val" not in found.splits or (cfg.test_fraction and "test" not in found.splits)
    if missing and not cfg.splits_from:  # a splits file is used exactly as written
        carve(found, cfg.val_fraction, cfg.test_fraction, cfg.split_seed, grouped)
    if cfg.train_fraction < 1.0 and not found.unused:  # a splits file's subset is used as is
        # Same stratified splitter: the "val" part of a (1 - fraction) split is the subset we keep.
        _, kept = stratified_split(found.splits["train"], cfg.train_fraction, cfg.split_seed + 1)
        # The splitter never holds out a class's only image, so such a class would vanish from
        # training altogether: keep that one image.
        kept_classes = {s.labels[0] for s in kept if s.labels}
        kept += [s for s in found.splits["train"] if s.labels and s.labels[0] not in kept_classes]
        if not kept:
            raise DataError(
                f"data.train_fraction {cfg.train_fraction} keeps no training image; raise it"
            )
        kept_paths = {s.path for s in kept}
        found.unused = [s for s in found.splits["train"] if s.path not in kept_paths]
        found.splits["train"] = kept
    return found


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader `worker_init_fn`: seed the worker's augmentation from its torch seed and rank.

    A worker's torch seed is the loader's base seed (drawn from the seeded global generator
    for every new set of workers) plus its id, so workers differ from each other, persistent
    workers continue their own streams from epoch to epoch, and a run with the same
    `trainer.seed` repeats exactly. The rank keeps DDP processes apart.
    """
    ignore_stop_signals()  # the main process stops the run (vittune/data/workers.py)
    pl_worker_init_function(worker_id, rank)  # what Lightning does when no worker_init_fn is set
    info = get_worker_info()
    seed_augmentation(info.dataset.transform, np.random.SeedSequence([info.seed, rank]))


class ImageDataModule(L.LightningDataModule):
    def __init__(
        self,
        cfg: DataConfig,
        augment: AugmentConfig,
        img_size: int | tuple[int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        in_chans: int,
        found: SplitSamples | None = None,
        run_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.found = found or scan_sources(cfg)
        self.classes = self.found.classes
        self.train_transform = build_train_transform(augment, img_size, mean, std)
        # Presets without float steps hand training images over as uint8 / uint16; the task
        # normalises them on the device (VitTask.on_after_batch_transfer) with these values.
        self.normalise = IntegerNormalise(mean, std)
        if isinstance(self.train_transform, IntegerFirst):
            self.train_transform.integers = True
        self.eval_transform = build_eval_transform(img_size, mean, std)
        self.in_chans = in_chans
        self.dicom = options_from(cfg)
        self.even_batches = augment.mixup_alpha + augment.cutmix_alpha > 0
        self.run_dir = Path(run_dir) if run_dir is not None else None
        # Workers report files that fail to decode here (see CorruptLog); without a run folder
        # (a notebook, a test) a file of its own in the temporary folder.
        self.corrupt_log = CorruptLog(
            self.run_dir / ".corrupt_decode.log"
            if self.run_dir is not None
            else Path(tempfile.gettempdir()) / f"vittune-corrupt-{uuid.uuid4().hex}.log"
        )
        self._caches: dict[str, DecodedCache] = {}  # split -> decoded pixels (data.cache)

    def setup(self, stage: str) -> None:
        """Fill `data.cache` for the splits `stage` reads, before any loader starts.

        Under DDP a disk cache is written once per node: local rank 0 decodes, the other
        processes wait at the barrier and then map the finished file. A memory cache is per
        process (each DDP process holds its own copy).
        """
        if self.cfg.cache == "none":
            return
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        splits = [s for s in wanted.get(stage, ()) if s in self.found.splits]
        trainer = self.trainer
        if self.cfg.cache == "disk" and trainer is not None and trainer.world_size > 1:
            if trainer.local_rank == 0:
                for split in splits:
                    self.cache(split)
            trainer.strategy.barrier("vittune-decoded-cache")
        for split in splits:
            self.cache(split)

    def cache(self, split: str) -> DecodedCache | None:
        """The decoded pixels of `split` (decoded on first use); None for `data.cache: none`."""
        if self.cfg.cache == "none":
            return None
        if split not in self._caches:
            paths = [sample.path for sample in self.found.splits[split]]
            limit, workers = self.cfg.max_image_pixels, self.cfg.num_workers
            if self.cfg.cache == "memory":
                self._caches[split] = build_memory_cache(paths, limit, workers, dicom=self.dicom)
            else:
                folder = Path(self.cfg.cache_dir) if self.cfg.cache_dir else default_cache_dir()
                self._caches[split] = build_disk_cache(
                    paths, limit, folder, workers, dicom=self.dicom
                )
        return self._caches[split]

    def class_counts(self) -> torch.Tensor:
        """Training images per class (for balanced class weights)."""
        if "train" not in self.found.splits:
            raise DataError("balanced class weights need a train split; the data has none")
        counts = Counter(label for s in self.found.splits["train"] for label in s.labels)
        return torch.tensor([counts.get(i, 0) for i in range(len(self.classes))], dtype=torch.float)

    def dataset(self, split: str, train: bool = False) -> Dataset:
        if split not in self.found.splits:
            raise DataError(
                f"the data has no {split!r} split; add a {split}/ folder or CSV rows with split={split}"
            )
        if self.cfg.format == "litdata":
            from vittune.data.streaming import shard_dataset  # noqa: PLC0415 (needs litdata)

            return shard_dataset(
                self.cfg,
                self.found.splits[split],
                split,
                train,
                self.train_transform if train else self.eval_transform,
                len(self.classes),
                self.in_chans,
                self.corrupt_log,
            )
        return ImageDataset(
            self.found.splits[split],
            num_classes=len(self.classes),
            transform=self.train_transform if train else self.eval_transform,
            in_chans=self.in_chans,
            intensity=self.cfg.intensity,
            multi_label=self.cfg.multi_label,
            on_corrupt=self.cfg.on_corrupt,
            max_pixels=self.cfg.max_image_pixels,
            corrupt_log=self.corrupt_log,
            dicom=self.dicom,
            # Only a cache the loaders (or setup) filled: evaluate and export read a few
            # or all images once, and a fill pass first would only add work.
            cache=self._caches.get(split),
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        batch = self.cfg.batch_size if train else (self.cfg.eval_batch_size or self.cfg.batch_size)
        workers = self.cfg.num_workers
        self.cache(split)  # filled here unless setup did (a loader made outside a Trainer)
        dataset = self.dataset(split, train=train)
        rank = self.trainer.global_rank if self.trainer is not None else 0
        if workers == 0:  # augmentation runs in this process: seed it from the seeded torch RNG
            draw = int(torch.randint(0, 2**62, ()).item())
            seed_augmentation(dataset.transform, np.random.SeedSequence([draw, rank]))
        if train and self.cfg.format == "litdata":  # litdata shuffles and shares out the chunks
            from vittune.data.streaming import stream_loader  # noqa: PLC0415

            return stream_loader(
                dataset,
                batch,
                workers,
                pin_memory=self._pin_memory(),
                prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
                worker_init_fn=partial(seed_worker, rank=rank),
                collate_fn=SkipCorrupt(even=self.even_batches, normalise=self.normalise),
            )
        # Evaluation under DDP: each process gets every world_size-th image and none twice.
        # Lightning would add a DistributedSampler, which pads the last shard with repeated
        # images that torchmetrics then counts; it keeps a DistributedSampler it finds here.
        shards = None if train or self.trainer is None else self.trainer.distributed_sampler_kwargs
        sampler = UnrepeatedDistributedSampler(dataset, shuffle=False, **shards) if shards else None
        return DataLoader(
            dataset,
            batch_size=batch,
            shuffle=train,
            sampler=sampler,
            drop_last=train and len(self.found.splits[split]) > batch,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self._pin_memory(),
            prefetch_factor=self.cfg.prefetch_factor if workers > 0 else None,
            worker_init_fn=partial(seed_worker, rank=rank),
            collate_fn=SkipCorrupt(even=train and self.even_batches, normalise=self.normalise),
        )

    def _pin_memory(self) -> bool:
        """`data.pin_memory`, by default on when the batches go to a GPU."""
        if self.cfg.pin_memory is not None:
            return self.cfg.pin_memory
        if self.trainer is not None:
            return isinstance(self.trainer.accelerator, CUDAAccelerator)
        return torch.cuda.is_available()

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def corrupt_report(self, shown: int = 3) -> str | None:
        """Summarise every file left out of the run (at setup or when decoding) and write the
        full list to `<run_dir>/corrupt_files.txt`; None when every file was read."""
        left_out = {**self.found.refused, **self.corrupt_log.read()}
        if not left_out:
            return None
        paths = sorted(left_out)
        where = ""
        if self.run_dir is not None:
            listing = self.run_dir / "corrupt_files.txt"
            listing.write_text("".join(f"{p}\t{left_out[p]}\n" for p in paths))
            where = f"; all listed in {listing}"
        refused, failed = len(self.found.refused), len(set(left_out) - set(self.found.refused))
        first = ", ".join(str(p) for p in paths[:shown]) + (", ..." if len(paths) > shown else "")
        return (
            f"  corrupt files: {len(paths)} left out ({refused} unreadable at setup, not in any "
            f"split; {failed} failed to decode, dropped from their batches): {first}{where}"
        )
