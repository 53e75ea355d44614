"""Learning-rate schedules as multipliers of each group's own lr (so layer decay survives)."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(
    name: str, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0
) -> Callable[[int], float]:
    """step -> factor: linear warmup from 0, then cosine / linear decay to `min_ratio`, or flat."""
    total_steps = max(1, total_steps)
    warmup_steps = min(max(0, warmup_steps), total_steps - 1) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if name == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape

    return factor
