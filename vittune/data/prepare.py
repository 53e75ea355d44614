"""`vittune prepare-data RECIPE OUT`: the recipe's images written as litdata shards.

The images are found and split by `scan_sources`, exactly as a training run on the folder or
CSV would (unreadable files left out, the same seeded validation split and train_fraction).
Each split is written with `litdata.optimize` into `OUT/<split>/`, one item per image: the
file's original bytes (not re-encoded, so decoding at read time follows the same rules and
limits as files) and a small JSON record of its index, source path and class indices. Beside
the shards, `OUT/samples.csv` lists every image in shard order and `OUT/vittune.json` holds the
class names and how the shards were made; `data.format: litdata` reads both.
"""

from __future__ import annotations

import csv
import hashlib
import json
import multiprocessing
import random
import signal
from collections.abc import Callable
from pathlib import Path

from vittune.data.datamodule import scan_sources
from vittune.data.datasets import SplitSamples
from vittune.data.streaming import MANIFEST, METADATA, SCHEMA_VERSION, require_litdata
from vittune.errors import DataError, RecipeError
from vittune.files import handlers_restored
from vittune.recipe.schema import DataConfig, Recipe

CHUNK_BYTES = "64MB"  # litdata's recommended order of magnitude for object storage


def shard_item(entry: tuple[int, str, tuple[int, ...]]) -> dict[str, object]:
    """One image as litdata stores it: the file's bytes and a JSON record.

    The record is one JSON string on purpose: litdata picks a serializer per value, and a
    plain string that names an existing image file would be stored as that file's content.
    """
    index, path, labels = entry
    record = {"index": index, "path": path, "labels": list(labels)}
    return {"image": Path(path).read_bytes(), "record": json.dumps(record)}


def describe_source(cfg: DataConfig, found: SplitSamples) -> dict[str, object]:
    """Where the images came from and how they were split, with a hash of the listing
    (split, path, labels and size of every file) to tell two preparations apart."""
    if cfg.builtin:
        kind, where = "builtin", cfg.builtin
    elif cfg.csv:
        kind, where = "csv", str(Path(cfg.csv).resolve())
    else:
        kind, where = "folder", str(Path(cfg.root).resolve())
    listing = hashlib.sha256()
    for split, samples in found.splits.items():
        for sample in samples:
            size = sample.path.stat().st_size
            listing.update(f"{split}\t{sample.path}\t{sample.labels}\t{size}\n".encode())
    return {
        "kind": kind,
        "path": where,
        "val_fraction": cfg.val_fraction,
        "train_fraction": cfg.train_fraction,
        "split_seed": cfg.split_seed,
        "max_image_pixels": cfg.max_image_pixels,
        "listing_sha256": listing.hexdigest(),
    }


def _check_out(out: Path) -> None:
    if "://" in str(out):
        raise DataError(
            f"prepare-data writes to a local folder, not {out}; write locally, then copy the"
            " folder to object storage (e.g. aws s3 sync) and point data.root at it"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists and is not empty; pick a new output folder or remove it")


def prepare_data(recipe: Recipe, out: str | Path, log: Callable[[str], None] = print) -> dict:
    """Write `recipe`'s images as litdata shards under `out`; returns what vittune.json holds."""
    require_litdata()
    from litdata import optimize  # noqa: PLC0415 (litdata is only needed by this command)

    cfg, out = recipe.data, Path(out)
    if cfg.format != "files":
        raise RecipeError(
            "prepare-data reads images from a folder, CSV or builtin set; set data.format: files"
            " and point data.root or data.csv at the images"
        )
    _check_out(out)
    found = scan_sources(cfg)
    # Folders and CSVs list images class by class, and litdata shuffles chunks, then items
    # within the chunks a worker holds: written in that order, a batch would be mostly one
    # class. Training images go in once in a seeded random order (samples.csv records it).
    random.Random(cfg.split_seed).shuffle(found.splits["train"])
    out.mkdir(parents=True, exist_ok=True)
    # litdata's optimize installs its own SIGINT handler (it stops its workers, then exits the
    # process with status 0) and leaves it there: a Python session that prepared data keeps
    # its own Ctrl-C.
    with handlers_restored([signal.SIGINT]):
        for split, samples in found.splits.items():
            entries = [(i, str(s.path.absolute()), s.labels) for i, s in enumerate(samples)]
            log(f"  {split}: {len(entries)} images -> {out / split}")
            optimize(
                fn=shard_item,
                inputs=entries,
                output_dir=str((out / split).resolve()),
                chunk_bytes=CHUNK_BYTES,
                num_workers=max(1, min(cfg.num_workers, len(entries))),
                # Each worker writes a static, ordered slice, so shard order is the listing order
                # that samples.csv records (the reader checks every item's index against it).
                keep_data_ordered=True,
                reorder_files=False,
                verbose=False,
                # spawned workers re-import torch (a minute for a small folder here); fork where the
                # platform has it (Linux), the platform's default elsewhere
                start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
            )
    with (out / MANIFEST).open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["split", "index", "labels", "path"])
        for split, samples in found.splits.items():
            for i, s in enumerate(samples):
                writer.writerow([split, i, " ".join(map(str, s.labels)), str(s.path.absolute())])
    metadata = {
        "vittune_litdata": SCHEMA_VERSION,
        "classes": found.classes,
        "multi_label": cfg.multi_label,
        "labelled": cfg.labelled,
        "splits": {split: len(samples) for split, samples in found.splits.items()},
        "left_out": {str(p.absolute()): reason for p, reason in found.refused.items()},
        "source": describe_source(cfg, found),
    }
    (out / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata
