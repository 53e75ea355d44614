"""DeiT distillation (Touvron et al. 2021): a ViT student learns from labels and a frozen teacher.

A timm distilled DeiT has a class token and a distillation token, each with its own head: the
class head learns from the labels, the distillation head from the teacher, and prediction
averages the two heads' logits (as timm's `VisionTransformerDistilled` does at inference). A
student with one head (any other timm model) puts both terms on that head: the paper's
"usual distillation" without a distillation token.

timm's `TokenDistillationTask` computes the same loss, but it owns the student under its own
attribute and runs the whole step itself; here Lightning runs the step and the student must
stay `self.model` so that exports carry timm keys. The maths is in vittune.tasks.losses, the head
reading in vittune.models.heads, the teacher in vittune.models.teacher; everything about
metrics, mixing and evaluation logging is the classification task's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy

from vittune.models.heads import has_distillation_head, split_heads
from vittune.recipe.schema import Recipe
from vittune.tasks.classification import ClassificationTask
from vittune.tasks.losses import deit_loss, distillation_term
from vittune.tasks.metrics import EvaluationMetrics


class DistillationTask(ClassificationTask):
    """Classification whose loss adds a teacher term; single-label (recipe/checks.py)."""

    def __init__(
        self,
        recipe: Recipe,
        model: nn.Module,
        teacher: nn.Module,
        classes: list[str],
        run_dir: str | Path | None = None,
    ) -> None:
        super().__init__(recipe, model, classes, None, run_dir, teacher=teacher)

    def configure_models(
        self,
        model: nn.Module,
        classes: list[str],
        class_weights: torch.Tensor | None = None,
        teacher: nn.Module | None = None,
    ) -> None:
        super().configure_models(model, classes, class_weights)
        self.teacher = teacher
        cfg = self.recipe.distill
        self.kind, self.alpha, self.tau = cfg.type, cfg.alpha, cfg.tau
        self.two_heads = has_distillation_head(model)
        if self.two_heads:
            model.set_distilled_training(True)  # training forward returns (cls, dist) logits

    def extra_eval_metrics(self) -> dict[str, Metric]:
        """Top-1 of each head alone, and of the teacher (a wrong class alignment shows here)."""
        names = (["acc1_cls", "acc1_dist"] if self.two_heads else []) + (
            ["acc1_teacher"] if self.kind != "none" else []
        )
        n = len(self.classes)
        return {name: MulticlassAccuracy(num_classes=n, average="micro") for name in names}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The prediction: the average of the two heads' logits [B, K]."""
        cls_logits, dist_logits = split_heads(self.model, images)
        return (cls_logits + dist_logits) / 2

    def compiled_modules(self) -> list[nn.Module]:
        """The student, and the teacher when there is one: it is frozen, always in eval mode
        and without gradients, so it compiles to a single inference graph that is reused every
        step, and its forward is often the larger model (docs/compile.md)."""
        with_teacher = self.kind != "none" and self.teacher is not None
        return [self.model, self.teacher] if with_teacher else [self.model]

    def on_fit_start(self) -> None:
        super().on_fit_start()
        if getattr(self.teacher, "description", ""):
            self.print(
                f"  teacher: {self.teacher.description}; distillation {self.kind}, alpha {self.alpha}, tau {self.tau}"
            )

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        images, labels, mixed = self.mix(batch)  # the teacher sees the mixed images too
        cls_logits, dist_logits = split_heads(self.model, images)  # [B, K] each
        base = self.train_loss(cls_logits.float(), labels)
        term = None
        if self.kind != "none":
            teacher_logits = self.teacher(images)  # [B, K], no grad, student's class order
            term = distillation_term(dist_logits, teacher_logits, self.kind, self.tau)
        elif self.two_heads:
            # Without a teacher the distillation head learns the labels too, so that the
            # averaged prediction (and the export) is never half an untrained head.
            term = self.train_loss(dist_logits.float(), labels)
        loss = deit_loss(base, term, self.alpha if self.kind != "none" else 0.5)
        size = len(images)
        self.log_train_loss("train/loss", loss, size)
        self.log_train_loss("train/loss_cls", base, size, on_step=False)
        if term is not None:
            self.log_train_loss("train/loss_dist", term, size, on_step=False)
        if not mixed:
            self.score_training_batch((cls_logits + dist_logits) / 2, batch[1])
        return loss

    def _evaluate(self, batch: Any, metrics: EvaluationMetrics, model: nn.Module) -> torch.Tensor:
        images, targets = batch
        cls_logits, dist_logits = split_heads(model, images)
        logits = ((cls_logits + dist_logits) / 2).float()  # [B, K] the exported prediction
        probs = logits.softmax(dim=-1)
        metrics.update(probs, targets, self.eval_loss(logits, targets))
        if self.two_heads:
            metrics.extra["acc1_cls"].update(cls_logits.float(), targets)
            metrics.extra["acc1_dist"].update(dist_logits.float(), targets)
        if self.kind != "none":
            metrics.extra["acc1_teacher"].update(self.teacher(images).float(), targets)
        return probs

    # The teacher is rebuilt from the recipe on every run: keep its weights out of checkpoints
    # (a ResNet-50 teacher would otherwise double a ViT-S checkpoint) and put them back on load.
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict().items():
            state.setdefault(f"teacher.{key}", value)
