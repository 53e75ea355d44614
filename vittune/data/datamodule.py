"""The Lightning data module: scans the sources once, splits, and serves loaders."""

from __future__ import annotations

from collections import Counter

import lightning as L
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader

from vittune.data.builtin import BUILTIN
from vittune.data.datasets import (
    ImageDataset,
    SplitSamples,
    scan_csv,
    scan_folder,
    stratified_split,
)
from vittune.data.transforms import build_eval_transform, build_train_transform
from vittune.errors import DataError
from vittune.recipe.schema import AugmentConfig, DataConfig


def scan_sources(cfg: DataConfig) -> SplitSamples:
    """Find samples from the one configured source and make sure a validation split exists."""
    if cfg.builtin:
        found = scan_folder(BUILTIN[cfg.builtin](), labelled=cfg.labelled)
    elif cfg.csv:
        found = scan_csv(cfg.csv, multi_label=cfg.multi_label, labelled=cfg.labelled)
    else:
        found = scan_folder(cfg.root, labelled=cfg.labelled)
    if "val" not in found.splits:
        train, val = stratified_split(found.splits["train"], cfg.val_fraction, cfg.split_seed)
        if not val:
            raise DataError(
                "too few images to hold out a validation split; add images or provide a val split"
            )
        found.splits["train"], found.splits["val"] = train, val
    if cfg.train_fraction < 1.0:
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
        found.splits["train"] = kept
    return found


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
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.found = found or scan_sources(cfg)
        self.classes = self.found.classes
        self.train_transform = build_train_transform(augment, img_size, mean, std)
        self.eval_transform = build_eval_transform(img_size, mean, std)
        self.in_chans = in_chans

    def class_counts(self) -> torch.Tensor:
        """Training images per class (for balanced class weights)."""
        counts = Counter(label for s in self.found.splits["train"] for label in s.labels)
        return torch.tensor([counts.get(i, 0) for i in range(len(self.classes))], dtype=torch.float)

    def dataset(self, split: str, train: bool = False) -> ImageDataset:
        if split not in self.found.splits:
            raise DataError(
                f"the data has no {split!r} split; add a {split}/ folder or CSV rows with split={split}"
            )
        return ImageDataset(
            self.found.splits[split],
            num_classes=len(self.classes),
            transform=self.train_transform if train else self.eval_transform,
            in_chans=self.in_chans,
            intensity=self.cfg.intensity,
            multi_label=self.cfg.multi_label,
            on_corrupt=self.cfg.on_corrupt,
        )

    def _loader(self, split: str, train: bool) -> DataLoader:
        batch = self.cfg.batch_size if train else (self.cfg.eval_batch_size or self.cfg.batch_size)
        workers = self.cfg.num_workers
        dataset = self.dataset(split, train=train)
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
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)
