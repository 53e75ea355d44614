"""What timm's model hooks say about a model's parameters: layer ids, tokens without decay.

Freezing (models/) and parameter groups (optim/) both count layers; they share these answers
so that "block k" means the same thing to both.
"""

from __future__ import annotations

from timm.models import group_parameters
from torch import nn


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Position embeddings and tokens as the model declares them (timm's hook)."""
    return set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Parameter name -> layer id from timm's `group_matcher` (stem 0, blocks 1..depth, head last)."""
    if not hasattr(model, "group_matcher"):
        return {}
    return group_parameters(model, model.group_matcher(coarse=False), reverse=True)
