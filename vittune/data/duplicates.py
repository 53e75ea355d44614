"""The same image twice: refused, or kept once with a warning (`data.allow_duplicates`).

A CSV listing a file twice, the same file in train and val (20 of 44 validation images were
training images, without a word), or a class folder that is a link to `data.root` (every
image became a fifth class) give numbers that look fine and are wrong. Images are compared
by their resolved path (symlinks followed), before splits are made or counted.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from vittune.data.datasets import Sample, SplitSamples
from vittune.errors import DataError

# Which copy is kept: evaluation splits stay as they are, training gives its copy up.
KEEP_ORDER = ("test", "val", "train")
SHOWN = 3


def _where(found: SplitSamples, sample: Sample, split: str) -> str:
    names = [found.classes[i] for i in sample.labels if i < len(found.classes)]
    return f"{split}/{','.join(names)}" if names else split


def remove_duplicates(found: SplitSamples, allow: bool) -> SplitSamples:
    """Refuse (or with `allow`, drop all but one copy of) images listed more than once."""
    first: dict[Path, tuple[str, Sample]] = {}
    repeats: list[str] = []
    kept: dict[str, list[Sample]] = {}
    order = sorted(found.splits, key=lambda s: KEEP_ORDER.index(s) if s in KEEP_ORDER else -1)
    for split in order:
        kept[split] = []
        for sample in found.splits[split]:
            real = sample.path.resolve()
            if real in first:
                seen_split, seen = first[real]
                repeats.append(
                    f"{sample.path} ({_where(found, sample, split)}) is"
                    f" {seen.path} ({_where(found, seen, seen_split)})"
                )
                continue
            first[real] = (split, sample)
            kept[split].append(sample)
    if not repeats:
        return found
    shown = "; ".join(repeats[:SHOWN]) + (
        f"; ... {len(repeats)} in all" if len(repeats) > SHOWN else ""
    )
    if not allow:
        raise DataError(
            f"the data lists the same image more than once: {shown}; remove the copies (a class"
            " folder linked to data.root?), or set data.allow_duplicates: true to keep one of each"
        )
    found.splits = {split: kept[split] for split in found.splits}
    _check_classes_left(found)
    warnings.warn(
        f"data.allow_duplicates: {len(repeats)} repeated images kept once (evaluation splits"
        f" keep theirs): {shown}",
        stacklevel=2,
    )
    return found


def _check_classes_left(found: SplitSamples) -> None:
    present = {i for samples in found.splits.values() for s in samples for i in s.labels}
    empty = [name for i, name in enumerate(found.classes) if i not in present]
    if empty and found.classes:
        raise DataError(
            f"classes {empty} hold only copies of other images (a folder linked to data.root?);"
            " remove them"
        )
