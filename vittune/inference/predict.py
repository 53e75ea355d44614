"""`vittune predict RUN INPUTS... --out preds.csv`: class probabilities for any images.

Files, folders, globs and CSVs are expanded (vittune.evaluation.inputs); every image goes
through the run's evaluation preprocessing and model in batches; a file that cannot be read
gets a row with its error instead of stopping the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from vittune.data.decode import read_raw, to_float
from vittune.data.dicom import DicomOptions
from vittune.data.workers import ignore_stop_signals
from vittune.errors import DataError, RecipeError
from vittune.evaluation.clinical_run import load_operating_point
from vittune.evaluation.inputs import expand_inputs
from vittune.evaluation.prediction_csv import write_predictions
from vittune.inference.devices import device_for
from vittune.inference.trained_run import build_trained, load_trained_run


@dataclass
class Predictions:
    out: Path
    paths: list[Path]
    probs: np.ndarray  # [N, K]; rows of unreadable files are NaN
    errors: list[str | None]
    classes: list[str]


def image_tensor(
    source: Path | bytes,
    name: str | Path,
    transform,
    in_chans: int,
    intensity: str,
    limit,
    dicom: DicomOptions | None = None,
) -> torch.Tensor:
    """One image (a file or its bytes) decoded and transformed as `vittune predict` does.

    The one preprocessing step of predict, shared with `vittune serve` so that a served answer
    equals predict's for the same file. Raises `DataError` for an unreadable image.
    """
    pixels = to_float(
        read_raw(source, name, limit, dicom), in_chans, intensity
    )  # [H, W, C] in [0, 1]
    return transform(image=pixels)["image"]  # [C, H, W], normalised


class _Files(Dataset):
    """(index, image tensor or None, error or None) for each file, decoded as in training."""

    def __init__(
        self, paths: list[Path], transform, in_chans: int, intensity: str, limit, dicom=None
    ) -> None:
        self.paths, self.transform = paths, transform
        self.in_chans, self.intensity, self.limit = in_chans, intensity, limit
        self.dicom = dicom

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        path = self.paths[index]
        try:
            image = image_tensor(
                path, path, self.transform, self.in_chans, self.intensity, self.limit, self.dicom
            )
        except DataError as err:
            return index, None, str(err)
        return index, image, None


def _collate(items: list) -> list:
    return items  # images are stacked after the unreadable ones are taken out


@torch.no_grad()
def predict_files(
    run_folder: str | Path,
    inputs: list[str],
    out: str | Path,
    weights: str = "best",
    batch_size: int | None = None,
    flip: bool = False,
    threshold: float = 0.5,
    top_k: int = 3,
    device: str = "auto",
    progress: bool | None = None,
) -> Predictions:
    """Predict every image in `inputs` with a trained run; write the CSV to `out`."""
    if not 0.0 < threshold < 1.0:
        raise RecipeError(f"--threshold must be between 0 and 1, got {threshold}")
    if top_k < 1:
        raise RecipeError(f"--top-k must be at least 1, got {top_k}")
    if batch_size is not None and batch_size < 1:
        raise RecipeError(f"--batch-size must be at least 1, got {batch_size}")
    if Path(out).is_dir():
        raise RecipeError(
            f"--out {out} is a folder; give a file, e.g. {Path(out) / 'predictions.csv'}"
        )
    target = device_for(device)  # refused here, before any work, when not available
    run = load_trained_run(run_folder, [], weights)
    saved = load_operating_point(run.folder)
    paths = expand_inputs(inputs)
    assembly = build_trained(run)
    cfg, task = run.recipe.data, assembly.task
    files = _Files(
        paths,
        assembly.datamodule.eval_transform,
        run.recipe.model.in_chans,
        cfg.intensity,
        cfg.max_image_pixels,
        assembly.datamodule.dicom,
    )
    loader = DataLoader(
        files,
        batch_size=batch_size if batch_size is not None else cfg.eval_batch_size or cfg.batch_size,
        num_workers=cfg.num_workers,
        collate_fn=_collate,
        worker_init_fn=ignore_stop_signals,
    )
    task.to(target).eval()
    probs = np.full((len(paths), len(run.classes)), np.nan, dtype=np.float32)
    errors: list[str | None] = [None] * len(paths)
    # tqdm's disable=None: a bar on a terminal, nothing in a log file.
    for items in tqdm(
        loader, desc="predict", unit="batch", disable=None if progress is None else not progress
    ):
        for index, _, error in items:
            errors[index] = error
        good = [(index, image) for index, image, _ in items if image is not None]
        if not good:
            continue
        images = torch.stack([image for _, image in good]).to(target)  # [B, C, H, W]
        p = task.probabilities(task(images))
        if flip:  # horizontal-flip averaging: the mean of the two probability vectors
            p = (p + task.probabilities(task(images.flip(-1)))) / 2
        probs[[index for index, _ in good]] = p.float().cpu().numpy()
    written = write_predictions(
        out,
        paths,
        probs,
        run.classes,
        errors=errors,
        multi_label=run.multi_label,
        threshold=threshold,
        top_k=min(top_k, len(run.classes)),
        operating=(saved or {}).get("thresholds"),  # `vittune evaluate --operating-point`
    )
    return Predictions(written, paths, probs, errors, run.classes)
