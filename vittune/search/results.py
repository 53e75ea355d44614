"""What a sweep worker and the LR range test hand back, read by the reports and plots."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class SweepResult:
    sweep_dir: Path
    study_name: str
    monitor: str
    ran: list[int]  # trial numbers this worker ran
    best_number: int | None
    best_value: float | None
    files: list[Path] = field(default_factory=list)


@dataclass
class RangeTest:
    lrs: list[float] = field(default_factory=list)  # optim.lr at each step
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    group_names: list[str] = field(default_factory=list)
    group_lrs: list[list[float]] = field(default_factory=list)  # [step][group], as stepped
    scales: list[float] = field(default_factory=list)  # each group's lr / optim.lr
    stopped: str = ""
    suggestion: float | None = None
