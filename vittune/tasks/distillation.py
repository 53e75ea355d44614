"""DeiT distillation (Touvron et al. 2021): a ViT student learns from labels and a frozen teacher.

A timm distilled DeiT has a class token and a distillation token, each with its own head: the
class head learns from the labels, the distillation head from the teacher, and prediction
averages the two heads' logits (as timm's `VisionTransformerDistilled` does at inference). A
student with one head (any other timm model) puts both terms on that head: the paper's
"usual distillation" without a distillation token.

timm's `TokenDistillationTask` computes the same loss, but it owns the student under its own
attribute and runs the whole step itself; here Lightning runs the step and the student must
stay `self.model` so that exports carry timm keys. We keep its maths (`distillation_term`) and
build the teacher on its `DistillationTeacher` (vittune.models.teacher).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from vittune.errors import RecipeError
from vittune.recipe.schema import Recipe
from vittune.tasks.base import VitTask
from vittune.tasks.metrics import EvaluationMetrics, classification_metrics


def has_distillation_head(model: nn.Module) -> bool:
    """True for timm's distilled DeiT (class + distillation tokens, `head` + `head_dist`)."""
    return hasattr(model, "set_distilled_training") and isinstance(
        getattr(model, "head_dist", None), nn.Linear
    )


def split_heads(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-head, distillation-head) logits, each [B, K]; one head answers twice.

    In training with `set_distilled_training(True)` timm returns both heads itself; in eval
    it returns only their average, so the two heads are read here from the two tokens as
    timm's `forward_head` does.
    """
    if not has_distillation_head(model):
        logits = model(images)  # [B, K]
        return logits, logits
    if model.training and model.distilled_training:
        return model(images)
    tokens = model.forward_features(images)  # [B, 2 + N, D]: class, distillation, patches
    cls_logits = model.head(model.head_drop(tokens[:, 0]))  # [B, K]
    dist_logits = model.head_dist(model.head_drop(tokens[:, 1]))  # [B, K]
    return cls_logits, dist_logits


def distillation_term(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, tau: float = 1.0
) -> torch.Tensor:
    """The DeiT teacher term on the distillation head's logits [B, K].

    hard: cross-entropy with the teacher's argmax as the label.
    soft: tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)), mean over the batch
    (the paper's formula and timm's `batchmean`; DeiT's code divides the summed KL by B * K,
    which is the same term scaled by 1 / K).
    """
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    if kind == "hard":
        return F.cross_entropy(student_logits, teacher_logits.argmax(dim=-1))
    if kind == "soft":
        log_student = F.log_softmax(student_logits / tau, dim=-1)  # [B, K]
        log_teacher = F.log_softmax(teacher_logits / tau, dim=-1)  # [B, K]
        kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
        return kl * tau**2
    raise ValueError(f"unknown distillation type {kind!r}")


def deit_loss(base: torch.Tensor, term: torch.Tensor | None, alpha: float) -> torch.Tensor:
    """(1 - alpha) * label loss + alpha * teacher term; the label loss alone without a term."""
    return base if term is None else (1.0 - alpha) * base + alpha * term


class DistillationTask(VitTask):
    default_monitor = ("val/acc1", "max")

    def __init__(
        self,
        recipe: Recipe,
        model: nn.Module,
        teacher: nn.Module,
        classes: list[str],
        run_dir: str | Path | None = None,
    ) -> None:
        super().__init__(recipe, run_dir)
        if recipe.distill is None:
            raise RecipeError("distillation needs a `distill:` section with a teacher")
        if recipe.data.multi_label:
            raise RecipeError(
                "vittune distill is single-label; set data.multi_label: false or use vittune finetune"
            )
        augment = recipe.augment
        if augment.mixup_alpha + augment.cutmix_alpha > 0 and recipe.data.batch_size % 2:
            raise RecipeError(
                f"mixup/cutmix need an even data.batch_size, got {recipe.data.batch_size}"
            )
        if recipe.loss.class_weights != "none":
            raise RecipeError(
                "loss.class_weights is not supported by vittune distill; set loss.class_weights: none"
            )
        self.model = model
        self.teacher = teacher
        self.classes = list(classes)
        self.kind = recipe.distill.type
        self.alpha = recipe.distill.alpha
        self.tau = recipe.distill.tau
        self.two_heads = has_distillation_head(model)
        if self.two_heads:
            model.set_distilled_training(True)  # training forward returns (cls, dist) logits
        self.configure_losses()
        self.configure_metrics()

    def configure_losses(self) -> None:
        recipe, augment = self.recipe, self.recipe.augment
        self.mixup = None
        if augment.mixup_alpha > 0 or augment.cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=augment.mixup_alpha,
                cutmix_alpha=augment.cutmix_alpha,
                prob=augment.mix_prob,
                label_smoothing=recipe.loss.label_smoothing,
                num_classes=len(self.classes),
            )
            self.label_loss = SoftTargetCrossEntropy()
        else:
            self.label_loss = nn.CrossEntropyLoss(label_smoothing=recipe.loss.label_smoothing)
        self.eval_loss = nn.CrossEntropyLoss(reduction="none")  # per image, see EvaluationMetrics

    def configure_metrics(self) -> None:
        n = len(self.classes)
        metrics = classification_metrics(n, multi_label=False)
        self.train_metrics = MetricCollection({"acc1": metrics["acc1"].clone()}, prefix="train/")
        # Top-1 of each head alone, and of the teacher (a wrong class alignment shows here).
        names = (["acc1_cls", "acc1_dist"] if self.two_heads else []) + (
            ["acc1_teacher"] if self.kind != "none" else []
        )
        heads = {name: MulticlassAccuracy(num_classes=n, average="micro") for name in names}
        self.val_metrics = EvaluationMetrics(metrics, "val", self.classes, heads)
        self.test_metrics = EvaluationMetrics(metrics, "test", self.classes, heads)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The prediction: the average of the two heads' logits [B, K]."""
        cls_logits, dist_logits = split_heads(self.model, images)
        return (cls_logits + dist_logits) / 2

    def on_fit_start(self) -> None:
        if getattr(self.teacher, "description", ""):
            self.print(
                f"  teacher: {self.teacher.description}; distillation {self.kind}, alpha {self.alpha}, tau {self.tau}"
            )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, targets = batch
        labels = targets
        if self.mixup is not None:
            images, labels = self.mixup(images, targets)  # the teacher sees the mixed images too
        cls_logits, dist_logits = split_heads(self.model, images)  # [B, K] each
        base = self.label_loss(cls_logits.float(), labels)
        term = None
        if self.kind != "none":
            teacher_logits = self.teacher(images)  # [B, K], no grad, student's class order
            term = distillation_term(dist_logits, teacher_logits, self.kind, self.tau)
        elif self.two_heads:
            # Without a teacher the distillation head learns the labels too, so that the
            # averaged prediction (and the export) is never half an untrained head.
            term = self.label_loss(dist_logits.float(), labels)
        loss = deit_loss(base, term, self.alpha if self.kind != "none" else 0.5)
        size = len(images)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        self.log("train/loss_cls", base, on_step=False, on_epoch=True, batch_size=size)
        if term is not None:
            self.log("train/loss_dist", term, on_step=False, on_epoch=True, batch_size=size)
        if self.mixup is None:
            averaged = (cls_logits.detach() + dist_logits.detach()).float() / 2  # [B, K]
            self.train_metrics(averaged, targets)
            self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _evaluate(self, batch: Any, metrics: EvaluationMetrics) -> torch.Tensor:
        images, targets = batch
        cls_logits, dist_logits = split_heads(self.model, images)
        logits = ((cls_logits + dist_logits) / 2).float()  # [B, K] the exported prediction
        probs = logits.softmax(dim=-1)
        metrics.update(probs, targets, self.eval_loss(logits, targets))
        if self.two_heads:
            metrics.extra["acc1_cls"].update(cls_logits.float(), targets)
            metrics.extra["acc1_dist"].update(dist_logits.float(), targets)
        if self.kind != "none":
            metrics.extra["acc1_teacher"].update(self.teacher(images).float(), targets)
        return probs

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self.val_metrics.log(self, monitor=self.recipe.checkpoint.monitor)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self.test_metrics.log(self)

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, list | tuple) else batch
        return self(images).float().softmax(dim=-1)

    # The teacher is rebuilt from the recipe on every run: keep its weights out of checkpoints
    # (a ResNet-50 teacher would otherwise double a ViT-S checkpoint) and put them back on load.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict().items():
            state.setdefault(f"teacher.{key}", value)
