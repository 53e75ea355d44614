"""The end of a run: test the best (and optionally the last) weights, and write metrics.json.

`metrics.json` in the run folder is the one place that says what a run achieved: the
monitored metric, the best epoch and every validation number at that epoch, and the test
numbers of the weights that were exported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L

from vittune.tasks.assembly import Assembly
from vittune.training.checkpointing import BestCheckpoint


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


def _finite(values: dict[str, float]) -> dict[str, float | None]:
    return {k: (v if math.isfinite(v) else None) for k, v in values.items()}


def write_metrics_json(
    run_dir: Path,
    checkpoint: BestCheckpoint,
    tests: dict[str, dict[str, float]],
    test_auroc_ci95: list[float] | None = None,
) -> dict:
    """Write and return `metrics.json`: the best epoch's validation numbers and the tests
    (with the test report's bootstrap 95 % interval of the macro AUROC, once it exists).

    The best epoch and its `val/*` values are the ones the best-checkpoint callback recorded
    when it saved (kept across resumes, also into a new folder whose CSV log lacks them).
    """
    score = checkpoint.best_model_score
    best_score = float(score) if score is not None else None
    best = checkpoint.best_model_path
    document = {
        "monitor": checkpoint.monitor,
        "best_score": best_score if best_score is None or math.isfinite(best_score) else None,
        "best_epoch": checkpoint.best_epoch,
        "best_checkpoint": Path(best).name if best else None,
        "best_val": _finite(checkpoint.best_metrics),
        **{name: _finite(values) for name, values in tests.items()},
    }
    if test_auroc_ci95 is not None and "test" in document:
        document["test"]["auroc_macro_ci95"] = test_auroc_ci95
    (run_dir / "metrics.json").write_text(json.dumps(document, indent=2, allow_nan=False) + "\n")
    return document
