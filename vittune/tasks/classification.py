"""Image classification (single- or multi-label) on a timm backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import ConfusionMatrix, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassF1Score,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelF1Score,
)

from vittune.plots import save_confusion_matrix
from vittune.recipe.schema import Recipe
from vittune.tasks.base import VitTask
from vittune.tracking import log_image


def classification_metrics(num_classes: int, multi_label: bool) -> MetricCollection:
    """top-1 (and top-5 above 5 classes), macro F1 and macro AUROC."""
    if multi_label:
        return MetricCollection(
            {
                "acc1": MultilabelAccuracy(num_labels=num_classes),
                "f1": MultilabelF1Score(num_labels=num_classes, average="macro"),
                "auroc": MultilabelAUROC(num_labels=num_classes, average="macro"),
            }
        )
    metrics = {
        "acc1": MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro"),
        "f1": MulticlassF1Score(num_classes=num_classes, average="macro"),
        "auroc": MulticlassAUROC(num_classes=num_classes, average="macro"),
    }
    if num_classes > 5:
        metrics["acc5"] = MulticlassAccuracy(num_classes=num_classes, top_k=5, average="micro")
    return MetricCollection(metrics)


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """n_samples / (n_classes * n_c), as scikit-learn's `class_weight='balanced'`."""
    return counts.sum() / (len(counts) * counts.clamp(min=1))


class ClassificationTask(VitTask):
    default_monitor = ("val/acc1", "max")

    def __init__(
        self,
        recipe: Recipe,
        model: nn.Module,
        classes: list[str],
        class_weights: torch.Tensor | None = None,
        run_dir: str | Path | None = None,
    ) -> None:
        super().__init__(recipe, run_dir)
        self.model = model
        self.classes = list(classes)
        self.multi_label = recipe.data.multi_label
        self.configure_losses(class_weights)
        self.configure_metrics()

    def configure_losses(self, class_weights: torch.Tensor | None) -> None:
        recipe, n = self.recipe, len(self.classes)
        augment = recipe.augment
        self.mixup = None
        if augment.mixup_alpha > 0 or augment.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=augment.mixup_alpha,
                cutmix_alpha=augment.cutmix_alpha,
                prob=augment.mix_prob,
                label_smoothing=recipe.loss.label_smoothing,
                num_classes=n,
            )
            self.train_loss = SoftTargetCrossEntropy()
        elif self.multi_label:
            self.train_loss = nn.BCEWithLogitsLoss(pos_weight=class_weights)
        else:
            self.train_loss = nn.CrossEntropyLoss(
                weight=class_weights, label_smoothing=recipe.loss.label_smoothing
            )
        self.eval_loss = nn.BCEWithLogitsLoss() if self.multi_label else nn.CrossEntropyLoss()

    def configure_metrics(self) -> None:
        n = len(self.classes)
        metrics = classification_metrics(n, self.multi_label)
        self.train_metrics = MetricCollection({"acc1": metrics["acc1"].clone()}, prefix="train/")
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self.val_confusion = (
            None if self.multi_label else ConfusionMatrix(task="multiclass", num_classes=n)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.float().sigmoid() if self.multi_label else logits.float().softmax(dim=-1)

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, targets = batch
        mixed_targets = None
        if self.mixup is not None:
            images, mixed_targets = self.mixup(images, targets)
        logits = self(images)
        loss = self.train_loss(logits, mixed_targets if mixed_targets is not None else targets)
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(images)
        )
        if mixed_targets is None:
            # update() only, logged once per epoch: logging the Metric objects every step
            # costs ~2 ms/step of Lightning bookkeeping (benchmarks/RESULTS.md).
            self.train_metrics.update(
                self.probabilities(logits), targets.long() if self.multi_label else targets
            )
        return loss

    def on_train_epoch_end(self) -> None:
        if self.mixup is None:  # with mixup/cutmix there are no hard targets to score
            self.log_dict(self.train_metrics.compute())
        self.train_metrics.reset()

    def _evaluate(self, batch, metrics: MetricCollection, stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        loss = self.eval_loss(logits.float(), targets)
        probs = self.probabilities(logits)
        metrics.update(probs, targets.long() if self.multi_label else targets)
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=True,
            on_epoch=True,
            sync_dist=True,
            batch_size=len(images),
        )
        return probs

    def validation_step(self, batch, batch_idx: int) -> None:
        probs = self._evaluate(batch, self.val_metrics, "val")
        if self.val_confusion is not None:
            self.val_confusion.update(probs.argmax(dim=-1), batch[1])

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()
        if self.val_confusion is None:
            return
        matrix = self.val_confusion.compute()
        self.val_confusion.reset()
        if self.trainer.sanity_checking or not self.trainer.is_global_zero or self.run_dir is None:
            return
        path = save_confusion_matrix(
            matrix,
            self.classes,
            self.run_dir / "confusion_matrix.png",
            f"validation, epoch {self.current_epoch}",
        )
        log_image(self.loggers, "val/confusion_matrix", path)

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self.probabilities(self(images))
