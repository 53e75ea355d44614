"""`vittune evaluate RUN`: score a trained run on a split of its data, or on any folder or CSV.

One process, every image once (exact counts), the training preprocessing. The numbers come
from vittune.evaluation (each checked against scikit-learn); this module picks the images,
runs the model, and writes the report into `RUN/eval/<name>/`.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vittune.data.datamodule import scan_readable, scan_sources
from vittune.data.datasets import ImageDataset, Sample, SplitSamples
from vittune.data.workers import ignore_stop_signals
from vittune.errors import DataError, RecipeError
from vittune.evaluation.calibration import calibrated_bins
from vittune.evaluation.clinical_run import ClinicalOptions, check_clinical, clinical_numbers
from vittune.evaluation.figures import (
    save_confusion_figure,
    save_mistakes_grid,
    save_reliability_diagram,
    save_roc_curves,
)
from vittune.evaluation.prediction_csv import write_predictions
from vittune.evaluation.report import EvaluationReport, build_report
from vittune.files import check_folder_name, claim_fresh_folder
from vittune.inference.devices import device_for
from vittune.inference.tested_split import TestedSplit
from vittune.inference.trained_run import TrainedRun, align_to_run, build_trained, load_trained_run

SPLITS = ("auto", "train", "val", "test", "all")


@dataclass
class Evaluation:
    report: EvaluationReport
    folder: Path
    split: str
    paths: list[Path]
    probs: np.ndarray  # [N, K]
    skipped: list[Path]
    merging: list[dict] = field(default_factory=list)  # --token-merge rows, r = 0 first
    indices: list[int] = field(default_factory=list)  # the dataset index of each scored image
    clinical: dict = field(default_factory=dict)  # AUROC CIs, operating point, per group


class _Indexed(Dataset):
    """(index, (image, target) or None): keeps each prediction tied to its file."""

    def __init__(self, dataset: ImageDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, object]:
        return index, self.dataset[index]


def _collate(items: list[tuple[int, object]]) -> tuple[list[int], list[int], object]:
    kept = [(i, item) for i, item in items if item is not None]
    failed = [i for i, item in items if item is None]
    if not kept:
        return [], failed, None
    images = torch.stack([item[0] for _, item in kept])  # [B, C, H, W]
    targets = torch.stack([item[1] for _, item in kept])  # [B] or [B, K]
    return [i for i, _ in kept], failed, (images, targets)


@torch.no_grad()
def predict_dataset(
    task: torch.nn.Module,
    dataset: ImageDataset,
    batch_size: int,
    num_workers: int,
    device: torch.device,
) -> tuple[list[int], list[int], np.ndarray, np.ndarray]:
    """(scored indices, undecodable indices, probs [N, K], targets) over a dataset, in order."""
    loader = DataLoader(
        _Indexed(dataset),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        worker_init_fn=ignore_stop_signals,
    )
    task.to(device).eval()
    scored, failed, probs, targets = [], [], [], []
    for indices, bad, batch in loader:
        failed += bad
        if batch is None:
            continue
        scored += indices
        probs.append(task.probabilities(task(batch[0].to(device))).float().cpu())
        targets.append(batch[1])
    if not scored:
        raise DataError("no image could be decoded; check the files")
    return scored, failed, torch.cat(probs).numpy(), torch.cat(targets).numpy()


@torch.no_grad()
def token_merging_table(
    task: torch.nn.Module,
    dataset: ImageDataset,
    batch_size: int,
    device: torch.device,
    merges: list[int],
) -> list[dict]:
    """Top-1 and images per second (model forward only, decoding excluded) for r = 0 and each
    r of `merges`, on the same images; one row per r."""
    from vittune.models.token_merging import check_supported, token_merging, tokens_left  # noqa: PLC0415

    model = task.model
    check_supported(model)
    # Decoded again for every r rather than held in memory: a validation split of ViT-sized
    # images would not fit; the clock measures the forward alone either way.
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, collate_fn=_collate)
    grid = model.patch_embed.grid_size
    rows = []
    for r in [0, *sorted(set(merges) - {0})]:
        correct, seconds, count = 0, 0.0, 0
        with token_merging(model, r):
            for _, _, batch in loader:
                if batch is None:
                    continue
                images, targets = batch[0].to(device), batch[1]
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the copy is not the model's time
                start = time.perf_counter()
                logits = task(images)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                seconds += time.perf_counter() - start
                correct += int((logits.argmax(dim=-1).cpu() == targets).sum())
                count += len(images)
        rows.append(
            {
                "r": r,
                "tokens_last_block": tokens_left(grid[0] * grid[1], len(model.blocks), r),
                "acc1": correct / count,
                "images_per_s": count / seconds,
            }
        )
    return rows


def choose_samples(
    run: TrainedRun, split: str, new_data: bool, scanned: SplitSamples | None = None
) -> tuple[SplitSamples, str]:
    """The images to score: the run's test (else validation) split, or all of new data.
    `scanned`: the run's own data as its training scanned it (the test report at the end of
    a run passes it: a second scan of every header cost a third of a second on the digits)."""
    cfg = run.recipe.data
    if new_data:  # data.* overrides name other data: score all of it unless a split is named
        found = scan_readable(cfg)
        chosen = "all" if split == "auto" else split
    else:  # the run's own data, split exactly as in training (same seed and fractions)
        found = scanned if scanned is not None else scan_sources(cfg)
        chosen = ("test" if "test" in found.splits else "val") if split == "auto" else split
    if chosen == "all":
        samples = [s for entries in found.splits.values() for s in entries]
    elif chosen in found.splits:
        samples = found.splits[chosen]
    else:
        raise DataError(
            f"the data has no {chosen!r} split (it has {sorted(found.splits)}); pick --split"
            f" {'|'.join(sorted(found.splits))} or all"
        )
    if any(not s.labels for s in samples):
        raise DataError("evaluate needs labelled images; use `vittune predict` for unlabelled ones")
    picked = SplitSamples(found.classes, {"val": samples}, found.refused)
    return align_to_run(picked, run.classes), chosen


def _display_images(run: TrainedRun, dataset: Dataset, indices: list[int]) -> np.ndarray:
    """[M, C, H, W] in [0, 1] at the model's input size: what the model saw, before normalising.

    Read through the dataset that was scored (`load`), not from the source paths: shards
    (`data.format: litdata`) hold the images where the original files may no longer exist."""
    height, width = run.recipe.model.img_size
    pixels = [cv2.resize(dataset.load(i), (width, height)) for i in indices]
    return np.stack([p if p.ndim == 3 else p[:, :, None] for p in pixels]).transpose(0, 3, 1, 2)


def _write_per_class_csv(report: EvaluationReport, path: Path, clinical: dict) -> None:
    columns = ["precision", "recall", "specificity", "f1", "auroc"]
    bounds = {r["name"]: r for r in clinical.get("per_class", [])}
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", *columns, "auroc_ci95_low", "auroc_ci95_high", "support"])
        for row in report.per_class.rows():
            ci = [bounds.get(row["name"], {}).get(c) for c in ("auroc_ci95_low", "auroc_ci95_high")]
            writer.writerow(
                [row["name"], *(f"{row[c]:.6g}" for c in columns)]
                + ["" if v is None else f"{v:.6g}" for v in ci]
                + [row["support"]]
            )


def _target_names(report: EvaluationReport, target: np.ndarray) -> str:
    if report.multi_label:
        return ";".join(report.classes[k] for k in np.flatnonzero(target)) or "(none)"
    return report.classes[int(target)]


def write_outputs(
    run: TrainedRun, result: Evaluation, targets: np.ndarray, meta: dict, dataset: Dataset
) -> None:
    """metrics.json, per_class.csv, predictions.csv and the figures, into the eval folder."""
    report, folder = result.report, result.folder
    document = {**meta, **report.to_dict()}
    if result.clinical:
        document["auroc_macro_ci95"] = result.clinical["auroc_macro_ci95"]
        document["clinical"] = result.clinical
    (folder / "metrics.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    _write_per_class_csv(report, folder / "per_class.csv", result.clinical)
    write_predictions(
        folder / "predictions.csv",
        result.paths,
        result.probs,
        report.classes,
        multi_label=report.multi_label,
    )
    title = f"{run.folder.name}, {result.split} split, {report.num_samples} images"
    if not report.multi_label:
        save_confusion_figure(
            report.confusion, report.classes, folder / "confusion_matrix.png", title
        )
        fit = report.temperature  # --temperature: the calibrated curve too
        after = (
            calibrated_bins(result.probs, targets, fit.temperature, len(report.reliability.count))
            if fit is not None
            else None
        )
        save_reliability_diagram(
            report.reliability,
            folder / "reliability.png",
            title,
            after,
            fit.temperature if fit is not None else None,
        )
    if report.roc:
        save_roc_curves(report.roc, folder / "roc.png", title)
    picks = [int(i) for i in report.mistakes]
    if picks:
        predicted = result.probs.argmax(axis=1)  # [N]; multi-label: the most confident label
        save_mistakes_grid(
            _display_images(run, dataset, [result.indices[i] for i in picks]),
            [_target_names(report, targets[i]) for i in picks],
            [report.classes[int(predicted[i])] for i in picks],
            [float(result.probs[i, predicted[i]]) for i in picks],
            folder / "mistakes.png",
        )


def check_data_overrides(overrides: list[str]) -> None:
    """evaluate scores the run as it was trained: overrides may name other data (and how to
    read it), never the model (model.img_size=64 silently resampled the position embedding,
    model.in_chans=1 summed the patch embedding) or the training."""
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if not key.startswith("data."):
            raise RecipeError(
                f"evaluate takes data.* overrides only (the images to score and how to read"
                f" them), got {key}; it scores the run's model as trained"
            )


def evaluate_run(
    run_folder: str | Path,
    overrides: list[str] | None = None,
    split: str = "auto",
    weights: str = "best",
    name: str | None = None,
    temperature: bool = False,
    device: str = "auto",
    token_merge: list[int] | None = None,
    clinical: ClinicalOptions | None = None,
    scanned: SplitSamples | None = None,
    tested: TestedSplit | None = None,
) -> Evaluation:
    """Score a run; write `RUN/eval/<name>/` (never over an earlier evaluation). `scanned`:
    the run's data as its training scanned it, and `tested` that training's test pass of the
    split, when called at the end of that training (`tested` is used only if it scored every
    image: with one left out as unreadable, the rows no longer line up with the files)."""
    if split not in SPLITS:
        raise RecipeError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if name is not None:
        check_folder_name(name, "--name")
    overrides = list(overrides or [])
    check_data_overrides(overrides)
    on_device = device_for(device)  # refused here, before any work, when not available
    clinical = check_clinical(clinical or ClinicalOptions())
    run = load_trained_run(run_folder, overrides, weights)
    new_data = bool(overrides)  # data.* keys only (checked above): other data to score
    found, chosen = choose_samples(run, split, new_data, scanned)
    samples: list[Sample] = found.splits["val"]
    cfg = run.recipe.data
    batch = cfg.eval_batch_size or cfg.batch_size
    if token_merge and run.multi_label:
        raise RecipeError("--token-merge reports top-1 accuracy: single-label runs only")
    merging: list[dict] = []
    if tested is not None and not token_merge and len(tested.probs) == len(samples):
        dataset, probs, targets = tested.dataset, tested.probs, tested.targets
        scored, failed = list(range(len(samples))), []
    else:
        assembly = build_trained(run, found)
        dataset = assembly.datamodule.dataset("val")
        scored, failed, probs, targets = predict_dataset(
            assembly.task, dataset, batch, cfg.num_workers, on_device
        )
        if token_merge:
            merging = token_merging_table(assembly.task, dataset, batch, on_device, token_merge)
    report = build_report(
        probs,
        targets.astype(np.int64) if run.multi_label else targets,
        run.classes,
        temperature=temperature,
    )
    source = cfg.root or cfg.csv or f"builtin {cfg.builtin}"
    base_name = name or (chosen if not new_data else Path(str(source)).stem or chosen)
    folder = claim_fresh_folder(
        Path(run_folder) / "eval", base_name, "evaluation folder", "make the run folder writable"
    )
    result = Evaluation(
        report,
        folder,
        chosen,
        [samples[i].path for i in scored],
        probs,
        [samples[i].path for i in failed],
        merging,
        scored,
    )

    def val_scores() -> tuple[np.ndarray, np.ndarray]:  # the run's own validation split
        if chosen == "val" and not new_data:
            return probs, targets
        own = load_trained_run(run_folder, [], weights)
        picked, _ = choose_samples(own, "val", False)
        built = build_trained(own, picked)
        val = built.datamodule.dataset("val")
        return predict_dataset(built.task, val, batch, cfg.num_workers, on_device)[2:]

    groups = [samples[i].group for i in scored]
    result.clinical = clinical_numbers(
        run.folder, run.classes, clinical, probs, targets, groups, chosen, val_scores
    )
    meta = {
        "run": str(run.folder),
        "weights": str(run.weights),
        "data": str(source),
        "split": chosen,
        "overrides": list(overrides),
        "skipped_files": [str(p) for p in result.skipped],
        "token_merging": merging,
    }
    write_outputs(run, result, targets, meta, dataset)
    return result
