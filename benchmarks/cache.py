"""Epoch times with `data.cache: none | memory | disk`: the first epoch pays for decoding, later
ones should not.

Each run builds vittune's `ImageDataModule` from a recipe's data section and iterates the
training loader (decode where uncached, augmentation, batching; no model), as a training run
does. Epoch 1 includes `setup("fit")`, where a cache is filled (train and val splits, one
decode pass with `num_workers` processes), and the start of the persistent workers; epoch 2
is the next pass over the same loader. `disk, reused` is a second run that finds the disk
cache of the first. CPU time counts this process, the fill pass's workers and the loader's
workers.

Data: the quickstart recipe's (`data.builtin: digits`, 8x8 PNGs to 32 px, preset none,
in_chans 1, batch 64) and a generated folder of 5,000 images in 10 classes (half 8-bit RGB
JPEGs, half 16-bit grey PNGs, 96-192 px a side) at 112 px, preset light, in_chans 3, batch 64.

    python benchmarks/cache.py                 # both data sets, 2 workers
    python benchmarks/cache.py --write         # ... and update RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
from dataloader import cpu_seconds, natural_image
from results_md import RESULTS, machine, write_section  # noqa: E402 (benchmarks/ is on sys.path)

from vittune.data.datamodule import ImageDataModule
from vittune.recipe.schema import AugmentConfig, DataConfig

SECTION = "## Decoded-image cache: epoch times (data.cache)"
MODES = ("none", "memory", "disk", "disk, reused")


def make_folder(root: Path, count: int, seed: int = 0) -> Path:
    """`count` images in 10 classes: every other one an RGB JPEG, the rest 16-bit grey PNGs."""
    rng = np.random.default_rng(seed)
    for k in range(count):
        folder = root / f"class_{k % 10}"
        folder.mkdir(parents=True, exist_ok=True)
        height, width = rng.integers(96, 193, 2)
        if k % 2:
            rgb = np.round(natural_image(rng, height, width, 3) * 255).astype(np.uint8)
            cv2.imwrite(str(folder / f"{k:05d}.jpg"), rgb, [cv2.IMWRITE_JPEG_QUALITY, 90])
        else:
            grey = natural_image(rng, height, width, 1)[:, :, 0]
            cv2.imwrite(str(folder / f"{k:05d}.png"), np.round(grey * 65535).astype(np.uint16))
    return root


def cpu_now(pids: list[int]) -> float:
    """This process, its finished children (the fill pass's workers) and the live `pids`."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return cpu_seconds(pids) + children.ru_utime + children.ru_stime


def run(cfg: DataConfig, augment: AugmentConfig, img_size: int, in_chans: int) -> list:
    """[(epoch-1 wall, CPU), (epoch-2 wall, CPU)] for one fresh data module."""
    torch.manual_seed(0)
    start = time.perf_counter(), cpu_now([])
    module = ImageDataModule(cfg, augment, img_size, (0.5,) * in_chans, (0.25,) * in_chans,
                             in_chans)  # fmt: skip
    module.setup("fit")
    loader = module.train_dataloader()
    times, pids = [], []
    for _ in range(2):
        for _ in loader:
            pass
        if not pids and cfg.num_workers:
            pids = [w.pid for w in loader._iterator._workers]  # noqa: SLF001 (CPU from /proc)
        end = time.perf_counter(), cpu_now(pids)
        times.append((end[0] - start[0], end[1] - start[1]))
        start = end
    return times


def measure(cfg: DataConfig, augment: AugmentConfig, size: int, chans: int, repeats: int) -> dict:
    results: dict[str, list] = {mode: [] for mode in MODES}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory(prefix="vittune-cache-") as decoded:
            for mode in MODES:
                cache = mode.split(",")[0]
                changed = cfg.model_copy(update={"cache": cache, "cache_dir": decoded})
                results[mode].append(run(changed, augment, size, chans))
    return results


def table(name: str, images: int, results: dict) -> list[str]:
    def median(mode: str, epoch: int, kind: int) -> float:
        return statistics.median(r[epoch][kind] for r in results[mode])

    lines = []
    for mode in MODES:
        speedup = median("none", 1, 1) / median(mode, 1, 1)
        lines.append(
            f"| {name} ({images} train images) | {mode} | {median(mode, 0, 0):.2f}"
            f" | {median(mode, 0, 1):.2f} | {median(mode, 1, 0):.2f} | {median(mode, 1, 1):.2f}"
            f" | {'' if mode == 'none' else f'{speedup:.1f}x'} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="generated folder size")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--write", action="store_true", help=f"update {RESULTS.name}")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    started = time.perf_counter(), time.process_time()
    lines = [
        "| data | data.cache | epoch 1 wall s | epoch 1 CPU s | epoch 2 wall s | epoch 2 CPU s"
        " | epoch 2 speed-up (CPU) |",
        "|---|---|--:|--:|--:|--:|--:|",
    ]
    digits = DataConfig(builtin="digits", val_fraction=0.2, batch_size=64,
                        num_workers=args.workers)  # fmt: skip
    results = measure(digits, AugmentConfig(preset="none"), 32, 1, args.repeats)
    train = len(
        ImageDataModule(digits, AugmentConfig(), 32, (0.5,), (0.25,), 1).found.splits["train"]
    )
    lines += table("quickstart digits, 32 px", train, results)
    with tempfile.TemporaryDirectory(prefix="vittune-folder-") as folder:
        root = make_folder(Path(folder), args.images)
        generated = DataConfig(root=str(root), batch_size=64, num_workers=args.workers)
        results = measure(generated, AugmentConfig(preset="light"), 112, 3, args.repeats)
        train = len(
            ImageDataModule(
                generated, AugmentConfig(), 112, (0.5,) * 3, (0.25,) * 3, 3
            ).found.splits["train"]
        )
        lines += table("JPEG + 16-bit PNG, 96-192 px, to 112 px", train, results)
    text = "\n".join(lines)
    wall, cpu = time.perf_counter() - started[0], time.process_time() - started[1]
    load = os.getloadavg()[0]
    print(f"\n{text}\n\n{wall:.0f} s wall ({cpu:.0f} s CPU in the main process); load {load:.1f}")
    if args.write:
        flags = f"--images {args.images} --workers {args.workers} --repeats {args.repeats}"
        write_section(
            SECTION,
            f"{SECTION}\n\nMachine: {machine()}; load average {load:.1f} at the end.\n"
            f"Date: {time.strftime('%Y-%m-%d')}. Command: `python benchmarks/cache.py {flags}`."
            "\n\nTraining loader only (no model). Epoch 1 includes `setup` (the cache fill) and"
            " the worker start; epoch 2 is the next pass; `disk, reused` is a second run that"
            " finds the first run's file. CPU counts this process and every worker; speed-up ="
            f" epoch-2 CPU of `none` / that of the mode.\n\n{text}",
        )
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
