"""Image classification (single- or multi-label) on a timm backbone."""

from __future__ import annotations

from pathlib import Path

import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import ConfusionMatrix, MetricCollection

from vittune.plots import save_confusion_matrix
from vittune.recipe.schema import Recipe
from vittune.tasks.base import VitTask
from vittune.tasks.metrics import EvaluationMetrics, classification_metrics
from vittune.tracking import log_image


def balanced_class_weights(counts: torch.Tensor) -> torch.Tensor:
    """n_samples / (n_classes * n_c), as scikit-learn's `class_weight='balanced'`."""
    return counts.sum() / (len(counts) * counts.clamp(min=1))


class WeightedSoftTargetCrossEntropy(nn.Module):
    """Cross-entropy with class weights w [K] against soft targets y [B, K] (mixup, cutmix):

        loss = sum_i sum_c w_c * y_ic * -log p_ic  /  sum_i sum_c w_c * y_ic

    Numerator and denominator are linear in the target, so an image mixed lam : (1 - lam)
    from classes a and b counts as lam of an image of a plus (1 - lam) of one of b. With
    one-hot targets it is exactly `nn.CrossEntropyLoss(weight=w)` (which divides by the summed
    weights of the true classes); with w = 1 it is timm's `SoftTargetCrossEntropy`. torch's
    own weighted loss on probability targets divides by B instead, so it is neither, and timm
    has no weighted version: hence this one. With label smoothing inside the targets (timm's
    Mixup puts it there) the denominator also counts the smoothed mass, unlike torch's
    `label_smoothing`, whose denominator counts the true classes only.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight)  # the key torch's CrossEntropyLoss uses too

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        weighted = targets * self.weight  # [B, K]
        nll = -(weighted * logits.float().log_softmax(dim=-1)).sum()
        return nll / weighted.sum()


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
            self.train_loss = (
                SoftTargetCrossEntropy()
                if class_weights is None
                else WeightedSoftTargetCrossEntropy(class_weights)
            )
        elif self.multi_label:
            self.train_loss = nn.BCEWithLogitsLoss(pos_weight=class_weights)
        else:
            self.train_loss = nn.CrossEntropyLoss(
                weight=class_weights, label_smoothing=recipe.loss.label_smoothing
            )
        # Unweighted and per image (per image and label): EvaluationMetrics averages over images.
        self.eval_loss = (
            nn.BCEWithLogitsLoss(reduction="none")
            if self.multi_label
            else nn.CrossEntropyLoss(reduction="none")
        )

    def configure_metrics(self) -> None:
        n = len(self.classes)
        metrics = classification_metrics(n, self.multi_label)
        self.train_metrics = MetricCollection({"acc1": metrics["acc1"].clone()}, prefix="train/")
        self.val_metrics = EvaluationMetrics(metrics, "val", self.classes)
        self.test_metrics = EvaluationMetrics(metrics, "test", self.classes)
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

    def _evaluate(self, batch, metrics: EvaluationMetrics) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        probs = self.probabilities(logits)
        metrics.update(probs, targets, self.eval_loss(logits.float(), targets))
        return probs

    def validation_step(self, batch, batch_idx: int) -> None:
        probs = self._evaluate(batch, self.val_metrics)
        if self.val_confusion is not None:
            self.val_confusion.update(probs.argmax(dim=-1), batch[1])

    def on_validation_epoch_end(self) -> None:
        self.val_metrics.log(self, monitor=self.recipe.checkpoint.monitor)
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
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.test_metrics.log(self)

    def predict_step(self, batch, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self.probabilities(self(images))
