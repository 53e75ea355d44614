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
import torch
from lightning.pytorch.callbacks import Callback

from vittune.inference.tested_split import TestedSplit
from vittune.tasks.assembly import Assembly
from vittune.training.checkpointing import BestCheckpoint


class TestPredictions(Callback):
    """The probabilities and targets of each test batch, in order, as `test_step` scored them."""

    def __init__(self) -> None:
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.probs, self.targets = [], []  # each checkpoint tested starts afresh

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: torch.Tensor | None,
        batch: tuple[torch.Tensor, torch.Tensor],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if isinstance(outputs, torch.Tensor):
            self.probs.append(outputs.detach().float().cpu())  # [B, K]
            self.targets.append(batch[1].detach().cpu())  # [B] or [B, K]


def test_weights(
    trainer: L.Trainer, assembly: Assembly, checkpoints: dict[str, Path]
) -> tuple[dict[str, dict[str, float]], TestedSplit | None]:
    """Lightning's `trainer.test` on each named checkpoint; ({name: {"test/acc1": ...}}, the
    last checkpoint's predictions for the test report).

    Runs on every process (Lightning shards the test split without padding, see the data
    module) and returns the synced numbers everywhere. The best weights go last, so that the
    loggers' final test values (the W&B summary) are the exported model's. The predictions
    come back from a single process only (each DDP rank holds its own shard of them).
    """
    results = {}
    kept = TestPredictions()
    trainer.callbacks.append(kept)
    try:
        for name, path in checkpoints.items():
            metrics = trainer.test(
                assembly.task,
                datamodule=assembly.datamodule,
                ckpt_path=str(path),
                weights_only=True,
                verbose=False,
            )
            results[name] = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
    finally:
        trainer.callbacks.remove(kept)
    if trainer.world_size > 1 or not kept.probs:
        return results, None
    dataset = assembly.datamodule.dataset("test")
    return results, TestedSplit(
        dataset, torch.cat(kept.probs).numpy(), torch.cat(kept.targets).numpy()
    )


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
