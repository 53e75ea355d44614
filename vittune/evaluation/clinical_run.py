"""`vittune evaluate`'s clinical options, and the operating point a run keeps.

The threshold chosen on validation (`--operating-point`) is saved as
`RUN/operating_point.json`, so `vittune predict` decides with the same threshold that
evaluation reported, not with 0.5.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vittune.errors import DataError, RecipeError
from vittune.evaluation.clinical import DEFAULT_RESAMPLES, parse_operating_point
from vittune.evaluation.clinical_report import clinical_report
from vittune.files import atomic_write

OPERATING_POINT_FILE = "operating_point.json"
# Without --bootstrap, CIs are computed when images x classes x resamples stays below this
# (about 5 CPU-seconds): a 1,000-class evaluation of 50,000 images would take most of an hour.
AUTO_BUDGET = 1e8


@dataclass(frozen=True)
class ClinicalOptions:
    """--operating-point, --aggregate, --bootstrap, --bootstrap-seed."""

    operating_point: str | None = None  # spec=0.95 | sens=0.9 | youden
    aggregate: str | None = None  # mean | max: also score per group (patient/study)
    resamples: int | None = None  # None: DEFAULT_RESAMPLES, unless the data is too large
    seed: int = 0


def check_clinical(options: ClinicalOptions) -> ClinicalOptions:
    """One-line errors for bad options, before any model is built."""
    if options.operating_point is not None:
        try:
            parse_operating_point(options.operating_point)
        except ValueError as err:
            raise RecipeError(str(err)) from None
    if options.aggregate not in (None, "mean", "max"):
        raise RecipeError(f"--aggregate must be mean or max, got {options.aggregate!r}")
    if options.resamples is not None and options.resamples < 100:
        raise RecipeError(f"--bootstrap needs at least 100 resamples, got {options.resamples}")
    return options


def save_operating_point(run_folder: Path, section: dict) -> Path:
    """Write `operating_point.json` atomically (a reader never sees half a file)."""
    document = {
        "spec": section["spec"],
        "chosen_on": section["chosen_on"],
        "thresholds": {r["name"]: r["threshold"] for r in section["per_class"]},
    }
    path = Path(run_folder) / OPERATING_POINT_FILE
    atomic_write(path, lambda temp: temp.write_text(json.dumps(document, indent=2) + "\n"))
    return path


def load_operating_point(run_folder: Path) -> dict | None:
    """The saved thresholds {class: threshold} and how they were chosen; None if none saved."""
    path = Path(run_folder) / OPERATING_POINT_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text())
        return {"spec": document["spec"], "thresholds": dict(document["thresholds"])}
    except (ValueError, KeyError, TypeError):
        raise DataError(
            f"{path} is damaged; run `vittune evaluate --operating-point ...` again"
        ) from None


def clinical_numbers(
    run_folder: Path,
    classes: list[str],
    options: ClinicalOptions,
    probs: np.ndarray,
    targets: np.ndarray,
    groups: list[str | None],
    split: str,
    val_scores: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> dict:
    """The clinical section for metrics.json; saves the operating point when one is asked."""
    if options.aggregate and any(g is None for g in groups):
        raise RecipeError(
            "--aggregate needs a group per image: set data.group_column or data.group_pattern"
        )
    resamples = options.resamples or DEFAULT_RESAMPLES
    asked = options.resamples or options.operating_point or options.aggregate
    if not asked and probs.size * resamples > AUTO_BUDGET:
        return {
            "auroc_macro_ci95": [None, None],
            "skipped": f"95% CIs not computed for {probs.shape[0]} images x {probs.shape[1]} "
            f"classes (slow); pass --bootstrap {DEFAULT_RESAMPLES} to compute them",
        }
    val = val_scores() if options.operating_point else None
    report = clinical_report(
        probs,
        targets,
        list(classes),
        resamples=resamples,
        seed=options.seed,
        operating_point=options.operating_point,
        val=val,
        chosen_on="val" if split != "val" else "val (the evaluated split: optimistic)",
        groups=[str(g) for g in groups] if options.aggregate else None,
        aggregate=options.aggregate,
    )
    if "operating_point" in report:
        save_operating_point(run_folder, report["operating_point"])
    return report
