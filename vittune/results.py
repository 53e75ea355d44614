"""The end of a run: test the best (and optionally the last) weights, and write metrics.json.

`metrics.json` in the run folder is the one place that says what a run achieved: the
monitored metric, the best epoch and every validation number at that epoch, and the test
numbers of the weights that were exported.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import torch

from vittune.assembly import Assembly


def test_weights(
    trainer: L.Trainer, assembly: Assembly, checkpoints: dict[str, Path]
) -> dict[str, dict[str, float]]:
    """Lightning's `trainer.test` on each named checkpoint; {name: {"test/acc1": ...}}.

    Runs on every process (Lightning shards the test split without padding, see the data
    module) and returns the synced numbers everywhere. The best weights go last, so that the
    loggers' final test values (the W&B summary) are the exported model's.
    """
    results = {}
    for name, path in checkpoints.items():
        metrics = trainer.test(
            assembly.task,
            datamodule=assembly.datamodule,
            ckpt_path=str(path),
            weights_only=True,
            verbose=False,
        )
        results[name] = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
    return results


def best_epoch(best_checkpoint: str | None) -> int | None:
    if not best_checkpoint or not Path(best_checkpoint).is_file():
        return None
    state = torch.load(best_checkpoint, map_location="cpu", weights_only=True, mmap=True)
    return int(state["epoch"])


def validation_at(run_dir: Path, epoch: int | None) -> dict[str, float]:
    """Every `val/*` number logged at `epoch`, from the run's CSV log."""
    log = run_dir / "csv" / "metrics.csv"
    if epoch is None or not log.is_file():
        return {}
    found: dict[str, float] = {}
    with log.open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row.get("epoch") not in (str(epoch), f"{epoch}.0"):
                continue
            found.update(
                {
                    k: float(v)
                    for k, v in row.items()
                    if k.startswith("val/") and v not in ("", None)
                }
            )
    return found


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def write_metrics_json(
    run_dir: Path,
    monitor: str,
    best_score: float | None,
    best_checkpoint: str | None,
    tests: dict[str, dict[str, float]],
) -> dict:
    """Write and return `metrics.json`: the best epoch's validation numbers and the tests."""
    epoch = best_epoch(best_checkpoint)
    document = {
        "monitor": monitor,
        "best_score": best_score if best_score is None or math.isfinite(best_score) else None,
        "best_epoch": epoch,
        "best_checkpoint": Path(best_checkpoint).name if best_checkpoint else None,
        "best_val": _finite(validation_at(run_dir, epoch)),
        **{name: _finite(values) for name, values in tests.items()},
    }
    (run_dir / "metrics.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return document
