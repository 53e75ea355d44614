"""Image classification (single- or multi-label) on a timm backbone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import ConfusionMatrix, Metric, MetricCollection

from vittune.recipe.schema import Recipe
from vittune.tasks.base import VitTask
from vittune.tasks.ema import build_ema
from vittune.tasks.figures import log_image, save_confusion_matrix
from vittune.tasks.losses import build_mixup, eval_loss, label_loss
from vittune.tasks.metrics import EvaluationMetrics, classification_metrics

BEST_CONFUSION = "vittune_best_confusion"  # checkpoint key of the best epoch's counts


class ClassificationTask(VitTask):
    """Labels in, probabilities out; the distillation task extends it with a teacher."""

    default_monitor = ("val/acc1", "max")

    def __init__(
        self,
        recipe: Recipe,
        model: nn.Module,
        classes: list[str],
        class_weights: torch.Tensor | None = None,
        run_dir: str | Path | None = None,
        **parts: Any,
    ) -> None:
        super().__init__(
            recipe, run_dir, model=model, classes=classes, class_weights=class_weights, **parts
        )

    def configure_models(
        self, model: nn.Module, classes: list[str], class_weights: torch.Tensor | None = None
    ) -> None:
        self.model = model
        self.classes = list(classes)
        self.class_weights = class_weights
        self.multi_label = self.recipe.data.multi_label
        # `ema:` the average of `model` (tasks/ema.py); validation and test score it.
        self.ema = build_ema(model, self.recipe.ema) if self.recipe.ema is not None else None

    def configure_losses(self) -> None:
        self.mixup = build_mixup(self.recipe, len(self.classes))
        self.train_loss = label_loss(self.recipe, self.mixup is not None, self.class_weights)
        self.eval_loss = eval_loss(self.multi_label)

    def extra_eval_metrics(self) -> dict[str, Metric]:
        """Further metrics `_evaluate` updates itself (distillation: each head, the teacher)."""
        return {}

    def configure_metrics(self) -> None:
        n = len(self.classes)
        metrics = classification_metrics(n, self.multi_label)
        extra = self.extra_eval_metrics()
        self.train_metrics = MetricCollection({"acc1": metrics["acc1"].clone()}, prefix="train/")
        self.val_metrics = EvaluationMetrics(metrics, "val", self.classes, extra)
        # with an EMA, val/* scores the average and val_raw/* the weights being trained
        self.val_raw_metrics = (
            EvaluationMetrics(metrics, "val_raw", self.classes, extra)
            if self.ema is not None
            else None
        )
        self.test_metrics = EvaluationMetrics(metrics, "test", self.classes, extra)
        self.val_confusion = (
            None if self.multi_label else ConfusionMatrix(task="multiclass", num_classes=n)
        )
        self.epoch_confusion: torch.Tensor | None = None  # the last validation's [K, K] counts
        # the best epoch's: {"epoch", "counts" ([K, K] nested lists), "title"}
        self.best_confusion: dict[str, Any] | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def scored_model(self) -> nn.Module:
        """What validation (`val/*`), the test split and the export score: the EMA if any."""
        return self.ema.module if self.ema is not None else self.model

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid() if self.multi_label else logits.float().softmax(dim=-1)

    def mix(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, Any, bool]:
        """(images, targets for the loss, whether they were mixed) for one training batch."""
        images, targets = batch
        if self.mixup is None:
            return images, targets, False
        images, soft_targets = self.mixup(images, targets)
        return images, soft_targets, True

    def score_training_batch(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Running train accuracy on unmixed batches (with mixup there are no hard targets).

        update() only, logged once per epoch: logging the Metric objects every step costs
        ~2 ms/step of Lightning bookkeeping (benchmarks/RESULTS.md).
        """
        labels = targets.long() if self.multi_label else targets
        self.train_metrics.update(self.probabilities(logits.detach()), labels)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, loss_targets, mixed = self.mix(batch)
        logits = self(images)
        loss = self.train_loss(logits, loss_targets)
        self.log_train_loss("train/loss", loss, len(images))
        if not mixed:
            self.score_training_batch(logits, batch[1])
        return loss

    def on_train_epoch_end(self) -> None:
        if self.mixup is None:  # with mixup/cutmix there are no hard targets to score
            self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def _evaluate(self, batch: Any, metrics: EvaluationMetrics, model: nn.Module) -> torch.Tensor:
        images, targets = batch
        logits = model(images)
        probs = self.probabilities(logits)
        metrics.update(probs, targets, self.eval_loss(logits.float(), targets))
        return probs

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        probs = self._evaluate(batch, self.val_metrics, self.scored_model())
        if self.val_raw_metrics is not None:
            self._evaluate(batch, self.val_raw_metrics, self.model)
        if self.val_confusion is not None:
            self.val_confusion.update(probs.argmax(dim=-1), batch[1])

    def on_validation_epoch_end(self) -> None:
        self.val_metrics.log(self, monitor=self.recipe.checkpoint.monitor)
        if self.val_raw_metrics is not None:
            self.val_raw_metrics.log(self)
        if self.val_confusion is None:
            return
        # [K, K] counts, gathered from every process; drawn only if this epoch becomes the best
        self.epoch_confusion = self.val_confusion.compute().cpu()
        self.val_confusion.reset()

    def on_new_best(self, epoch: int, monitor: str, score: float) -> None:
        """Keep this epoch's confusion counts (BestCheckpoint calls this when the epoch is the
        best so far). The figure is drawn once, at the end of fit: drawing it at every new
        best cost about 0.3 s an epoch, most epochs of a short run being new bests."""
        matrix, self.epoch_confusion = self.epoch_confusion, None
        if matrix is not None:
            title = f"validation, epoch {epoch} (best {monitor} {score:.4f})"
            self.best_confusion = {"epoch": epoch, "counts": matrix.tolist(), "title": title}

    # In the checkpoint, so that a resumed run that finds no better epoch still draws the best
    # one's matrix (a kill -9 between a new best and the end of fit left no figure for it).
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.best_confusion is not None:
            checkpoint[BEST_CONFUSION] = self.best_confusion

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.best_confusion = checkpoint.get(BEST_CONFUSION, self.best_confusion)

    def on_fit_end(self) -> None:
        """Draw the best epoch's confusion matrix, so `confusion_matrix.png` matches the
        exported weights; none when the best checkpoint is not from a validation kept here."""
        super().on_fit_end()
        drawn = self.best_confusion
        if drawn is None or self.run_dir is None or not self.trainer.is_global_zero:
            return
        if drawn["epoch"] != getattr(self.trainer.checkpoint_callback, "best_epoch", None):
            return
        path = save_confusion_matrix(
            torch.tensor(drawn["counts"]),
            self.classes,
            self.run_dir / "confusion_matrix.png",
            drawn["title"],
        )
        log_image(self.loggers, "val/confusion_matrix", path)

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """The batch's probabilities, for the callbacks (the run's test report reuses them)."""
        return self._evaluate(batch, self.test_metrics, self.scored_model())

    def on_test_epoch_end(self) -> None:
        self.test_metrics.log(self)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self.probabilities(self(images))
