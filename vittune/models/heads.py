"""Reading a classifier's heads: timm's distilled DeiT has two, every other model one."""

from __future__ import annotations

import torch
from torch import nn


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
