"""The numbers an export is judged by: agreement with PyTorch, accuracy, size and latency.

The check images are the run's own validation split, decoded and preprocessed exactly as in
training (the assembly's eval transform); where the data is not on this machine, seeded
random inputs stand in and the caller says so.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from vittune.data.datamodule import scan_sources
from vittune.data.datasets import SplitSamples
from vittune.deploy.formats import Runner
from vittune.errors import DataError
from vittune.inference.trained_run import TrainedRun, align_to_run
from vittune.tasks.assembly import Assembly


@dataclass
class CheckImages:
    images: torch.Tensor  # [N, C, H, W], normalised as the model expects
    targets: np.ndarray | None  # [N] class indices (single-label runs with labels), else None
    source: str  # "validation" or "random"
    note: str | None = None  # why random inputs stand in


@dataclass
class Agreement:
    max_abs_diff: float  # largest |logit difference| over every image and class
    top1_agreement: float  # share of images whose top class is the same
    accuracy: float | None  # top-1 accuracy of the candidate against the labels


def validation_samples(run: TrainedRun) -> tuple[SplitSamples | None, str | None]:
    """The run's validation split (its seed and fractions), or None and why not."""
    try:
        found = scan_sources(run.recipe.data)
        picked = SplitSamples(found.classes, {"val": found.splits["val"]}, found.refused)
        return align_to_run(picked, run.classes), None
    except (DataError, OSError) as err:
        return None, f"the run's data is not readable here ({str(err).splitlines()[0]})"


def check_images(
    run: TrainedRun, assembly: Assembly, limit: int | None, note: str | None, seed: int = 0
) -> CheckImages:
    """Up to `limit` validation images (None: all) through the eval transform; random ones as a
    fallback. They are held in memory, hence the limit for large validation sets."""
    chans, (height, width) = run.recipe.model.in_chans, run.recipe.model.img_size
    if note is None:
        dataset = assembly.datamodule.dataset("val")
        picks = range(len(dataset))
        if limit is not None and limit < len(dataset):
            # evenly spaced, not the first `limit`: the split is ordered by class
            picks = np.unique(np.linspace(0, len(dataset) - 1, limit).round().astype(int))
        items = [item for item in (dataset[int(i)] for i in picks) if item is not None]
        if items:
            images = torch.stack([image for image, _ in items])  # [N, C, H, W]
            targets = None
            if not run.multi_label:
                targets = torch.stack([target for _, target in items]).numpy()  # [N]
            return CheckImages(images, targets, "validation")
        note = "no validation image could be decoded"
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(min(limit or 64, 64), chans, height, width, generator=generator)
    return CheckImages(images, None, "random", note)


def run_batched(runner: Runner, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """[N, K] outputs of a runner, batch by batch (the exported graphs take any batch size)."""
    return np.concatenate(
        [runner(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    )


@torch.no_grad()
def torch_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    model.eval()
    chunks = [model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    return torch.cat(chunks).numpy()  # [N, K]


def agreement(
    reference: np.ndarray, candidate: np.ndarray, targets: np.ndarray | None
) -> Agreement:
    """Compare [N, K] logits with the reference's; accuracy when labels are known."""
    predicted = candidate.argmax(axis=1)  # [N]
    return Agreement(
        max_abs_diff=float(np.abs(candidate - reference).max()),
        top1_agreement=float((predicted == reference.argmax(axis=1)).mean()),
        accuracy=None if targets is None else float((predicted == targets).mean()),
    )


def latency_ms(runner: Runner, shape: tuple[int, ...], repeats: int, warmup: int = 2) -> float:
    """Median wall time of one batch, per image, in milliseconds, on this machine's CPU."""
    batch = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    for _ in range(warmup):
        runner(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner(batch)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000.0 / shape[0]
