"""A split as a training's own test pass scored it, handed to the end-of-run test report.

Its own module so that the training imports it without the report's figures (matplotlib).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch.utils.data import Dataset


@dataclass
class TestedSplit:
    """`trainer.test`'s predictions in one process: the end-of-run report reuses them instead
    of predicting every image a second time."""

    dataset: Dataset  # the split's images, in sample order
    probs: np.ndarray  # [N, K], one row per image that decoded, in order
    targets: np.ndarray  # [N] class indices, or [N, K] multi-label
