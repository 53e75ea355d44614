"""`data.dicom_frame: all`: every frame of a multi-frame DICOM file is a sample of its own.

The frames of one file (a cine loop, an ultrasound clip, slices of one acquisition) are not
independent images, so they always share a group: a file's path is its group unless the
user gave one (`data.group_column` / `data.group_pattern`, usually the patient, which
keeps every file of a patient together as well). Held-out splits are then carved by group.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from vittune.data.datasets import Sample, SplitSamples
from vittune.data.dicom import frame_count, is_dicom_file
from vittune.errors import DataError


def _frames(path: Path) -> int:
    if not is_dicom_file(path):
        return 1
    try:
        return frame_count(path)
    except DataError:
        return 1  # unreadable headers were left out before; decoding reports any other fault


def expand_frames(found: SplitSamples) -> SplitSamples:
    """One sample per frame of each multi-frame DICOM file (`Sample.frame`), every sample
    in a group (its file's path when none was given)."""
    for split, samples in found.splits.items():
        expanded: list[Sample] = []
        for sample in samples:
            group = sample.group if sample.group is not None else str(sample.path)
            count = _frames(sample.path)
            if count == 1:
                expanded.append(replace(sample, group=group))
                continue
            expanded += [replace(sample, group=group, frame=k) for k in range(count)]
        found.splits[split] = expanded
    return found
