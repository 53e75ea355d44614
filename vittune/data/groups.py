"""Patient-level splits: every image of a group (patient, study) lands in one split.

Images of one patient are not independent: with per-image splits the same patient is in
train and in val/test, and the reported AUROC measures recognising the patient. Groups come
from a CSV column (`data.group_column`) or a regex on the path under `data.root`
(`data.group_pattern`); held-out splits are then carved whole groups at a time, stratified by
label with scikit-learn's `StratifiedGroupKFold`. Splits given by the user (split folders, a
split column) are checked for shared groups instead. `splits.csv` records every run's split
(path, split, labels, group) so it can be audited and reused (`data.splits_from`).
"""

from __future__ import annotations

import csv
import re
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

from vittune.data.datasets import SPLITS, Sample, SplitSamples, stratified_split
from vittune.errors import DataError, RecipeError


def assign_pattern_groups(found: SplitSamples, root: str | Path, pattern: str) -> None:
    """Set each sample's group to the regex's first group, searched in its path relative to
    `root` (POSIX separators, so `'^([^/]+)/'` names a patient folder level)."""
    try:
        regex = re.compile(pattern)
    except re.error as err:
        raise RecipeError(f"data.group_pattern {pattern!r} is not a regex: {err}") from None
    if regex.groups < 1:
        raise RecipeError(
            f"data.group_pattern {pattern!r} needs one capture group, e.g. '(P\\d+)_'"
        )
    missed = []
    for samples in found.splits.values():
        for sample in samples:
            where = Path(sample.path)
            where = where.relative_to(root) if where.is_relative_to(root) else where
            match = regex.search(where.as_posix())
            if match is None or not match.group(1):
                missed.append(where.as_posix())
                continue
            sample.group = match.group(1)
    if missed:
        raise DataError(
            f"data.group_pattern {pattern!r} matches no group in {len(missed)} path(s), e.g. "
            f"{missed[0]!r}; fix the pattern (it is searched in the path under data.root)"
        )


def _strata(samples: list[Sample]) -> np.ndarray:
    return np.array([s.labels[0] if s.labels else -1 for s in samples])  # [N] first label


def grouped_split(
    samples: list[Sample], fraction: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """(kept, held out): about `fraction` of the images held out, whole groups only,
    stratified by first label and seeded.

    One fold of `StratifiedGroupKFold(round(1 / fraction))`, so the share held out is
    1 / round(1 / fraction) of the images, as near as whole groups allow.
    """
    from sklearn.model_selection import StratifiedGroupKFold  # noqa: PLC0415

    groups = np.array([s.group for s in samples], dtype=object)  # [N]
    folds = max(2, round(1 / fraction))
    count = len(set(groups))
    if count < folds:
        raise DataError(
            f"only {count} groups to hold out {fraction:.0%} by group (needs {folds}); "
            "add data, raise the fraction, or give the splits yourself"
        )
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():  # rare classes: sklearn warns, the split is still by group
        warnings.simplefilter("ignore", UserWarning)
        kept, held = next(splitter.split(np.zeros(len(samples)), _strata(samples), groups))
    return [samples[i] for i in kept], [samples[i] for i in held]


def check_overlap(found: SplitSamples, allowed: bool) -> None:
    """Stop when one group is in two given splits (the leak grouping exists to prevent)."""
    seen: dict[str, set[str]] = defaultdict(set)
    for split, samples in found.splits.items():
        for sample in samples:
            if sample.group is not None:
                seen[sample.group].add(split)
    shared = sorted(g for g, splits in seen.items() if len(splits) > 1)
    if shared and not allowed:
        examples = "; ".join(
            f"{g!r} in {' and '.join(s for s in SPLITS if s in seen[g])}" for g in shared[:2]
        )
        raise DataError(
            f"{len(shared)} group(s) appear in more than one split (e.g. {examples}): their "
            "images leak between splits; move them into one split, or set "
            "data.allow_group_overlap: true"
        )


def carve(
    found: SplitSamples, val_fraction: float, test_fraction: float, seed: int, by_group: bool
) -> None:
    """Hold out test (when asked and not given) then val (when not given) from train."""
    split = grouped_split if by_group else stratified_split
    pool = found.splits["train"]
    if test_fraction and "test" not in found.splits:
        pool, test = split(pool, test_fraction, seed + 2)
        if not test:
            raise DataError("too few images to hold out data.test_fraction; add images")
        found.splits["test"] = test
    if "val" not in found.splits:
        share = min(val_fraction / (1.0 - test_fraction), 0.5) if test_fraction else val_fraction
        pool, val = split(pool, share, seed)
        if not val:
            raise DataError(
                "too few images to hold out a validation split; add images or provide a val split"
            )
        found.splits["val"] = val
    found.splits["train"] = pool


# The split of training images that data.train_fraction left out: listed, so that the file
# names every image of the data and a run that reuses it (data.splits_from) finds them all.
UNUSED = "unused"


def write_splits(path: Path, found: SplitSamples) -> None:
    """`splits.csv`: one row per image (path, split, labels, group), for audits and reuse.

    The group column holds only what the user's CSV or regex gave; nothing from file headers.
    """
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "split", "labels", "group"])
        listed = [(split, s) for split in SPLITS for s in found.splits.get(split, [])]
        for split, sample in [*listed, *((UNUSED, s) for s in found.unused)]:
            labels = ";".join(found.classes[i] for i in sample.labels)
            writer.writerow([str(sample.path), split, labels, sample.group or ""])


def apply_splits_file(found: SplitSamples, splits_csv: str | Path) -> None:
    """Put every sample in the split `splits_csv` (a run's `splits.csv`) gives its path."""
    splits_csv = Path(splits_csv)
    if not splits_csv.is_file():
        raise DataError(f"data.splits_from {splits_csv} does not exist; point it at a splits.csv")
    with splits_csv.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"path", "split"} <= set(rows[0]):
        raise DataError(f"data.splits_from {splits_csv} needs columns path,split (a splits.csv)")
    chosen = {str(Path(r["path"]).resolve()): r["split"] for r in rows}
    located = [(s, str(Path(s.path).resolve())) for v in found.splits.values() for s in v]
    missing = [s for s, where in located if where not in chosen]
    if missing:
        raise DataError(
            f"{len(missing)} image(s) are not in data.splits_from {splits_csv}, e.g. "
            f"{missing[0].path}; use the data that run used, or drop data.splits_from"
        )
    found.splits = {
        split: [s for s, where in located if chosen[where] == split] for split in SPLITS
    }
    found.splits = {k: v for k, v in found.splits.items() if v}
    found.unused = [s for s, where in located if chosen[where] == UNUSED]
    if "train" not in found.splits or "val" not in found.splits:
        raise DataError(f"data.splits_from {splits_csv} gives no train or no val images")
