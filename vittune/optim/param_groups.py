"""Optimiser parameter groups: layer-wise lr decay and no weight decay on norms, biases, tokens.

timm builds the groups; its `lr_scale` is only read by timm's own schedulers, so we
multiply it into each group's real `lr`, which Lightning and torch schedulers honour.
"""

from __future__ import annotations

from typing import Any

import timm.optim
import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from vittune.models.layers import layer_ids, no_weight_decay_names
from vittune.recipe.schema import OptimConfig


def build_param_groups(model: nn.Module, cfg: OptimConfig, lr: float) -> list[dict[str, Any]]:
    """Groups with their final `lr`, `weight_decay` and a readable `name`; frozen params left out."""
    skip = no_weight_decay_names(model)
    if cfg.layer_decay is not None:
        groups = param_groups_layer_decay(
            model, cfg.weight_decay, no_weight_decay_list=skip, layer_decay=cfg.layer_decay
        )
    else:
        groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=skip)
        for group in groups:
            group["lr_scale"] = 1.0
    names = {id(p): n for n, p in model.named_parameters()}
    ids = layer_ids(model)
    layer_max = max(ids.values()) if ids else 0
    for group in groups:
        scale = group.pop("lr_scale")
        first = names[id(group["params"][0])]
        layer = ids.get(first, layer_max) if cfg.layer_decay is not None else None
        kind = "decay" if group["weight_decay"] > 0 else "no_decay"
        group["name"] = f"layer_{layer}_{kind}" if layer is not None else kind
        group["layer_id"] = layer
        group["layer_scale"] = scale  # kept for display; `lr` already includes it
        group["lr"] = lr * scale
        group["param_names"] = [names[id(p)] for p in group["params"]]
    groups = [g for g in groups if g["params"]]
    return sorted(
        groups, key=lambda g: (g["layer_id"] if g["layer_id"] is not None else -1, g["name"])
    )


def build_optimizer(
    groups: list[dict[str, Any]], cfg: OptimConfig, lr: float
) -> torch.optim.Optimizer:
    """Any timm optimiser by name (checked with the recipe), over prepared groups (timm's factory)."""
    extra: dict[str, Any] = {}
    if cfg.betas is not None:
        extra["betas"] = tuple(cfg.betas)
    clean = [{k: v for k, v in g.items() if k not in ("param_names", "layer_id")} for g in groups]
    return timm.optim.create_optimizer_v2(
        clean, opt=cfg.name, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, **extra
    )
