"""Training losses shared by the classification and distillation tasks, and their mixing.

Each is a formula with a test against its reference (scikit-learn's balanced weights,
torch's weighted cross-entropy, timm's soft-target loss, the DeiT paper's terms).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from vittune.recipe.schema import Recipe


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


def build_mixup(recipe: Recipe, num_classes: int) -> Mixup | None:
    """timm's batch Mixup/CutMix from `augment:` (label smoothing goes into its soft targets)."""
    augment = recipe.augment
    if augment.mixup_alpha == 0 and augment.cutmix_alpha == 0:
        return None
    return Mixup(
        mixup_alpha=augment.mixup_alpha,
        cutmix_alpha=augment.cutmix_alpha,
        prob=augment.mix_prob,
        label_smoothing=recipe.loss.label_smoothing,
        num_classes=num_classes,
    )


def label_loss(
    recipe: Recipe, mixing: bool, class_weights: torch.Tensor | None = None
) -> nn.Module:
    """The loss on labels: soft targets when mixing, BCE for multi-label, else cross-entropy."""
    if mixing:
        if class_weights is None:
            return SoftTargetCrossEntropy()
        return WeightedSoftTargetCrossEntropy(class_weights)
    if recipe.data.multi_label:
        return nn.BCEWithLogitsLoss(pos_weight=class_weights)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=recipe.loss.label_smoothing)


def eval_loss(multi_label: bool) -> nn.Module:
    """Unweighted and per image (per image and label): evaluation averages it over images."""
    return (
        nn.BCEWithLogitsLoss(reduction="none")
        if multi_label
        else nn.CrossEntropyLoss(reduction="none")
    )


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
