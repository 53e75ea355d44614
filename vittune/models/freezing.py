"""Which parameters train: linear probing, frozen early blocks, gradual unfreezing.

Layers are counted with timm's `group_matcher` (stem = 0, blocks 1..depth, head/norm last),
the same ids that layer-wise lr decay uses, so "freeze 4 blocks" means the same thing for
ViT, DeiT, EVA, BEiT and CNNs alike.
"""

from __future__ import annotations

from torch import nn

from vittune.models import surgery
from vittune.models.layers import layer_ids


def head_parameter_names(model: nn.Module) -> set[str]:
    params = {n: p for n, p in model.named_parameters()}
    return set(surgery.classifier_keys(model, params))


def frozen_parameter_names(model: nn.Module, frozen_blocks: int, linear_probe: bool) -> set[str]:
    """Names of the parameters that must not train under these settings."""
    names = [n for n, _ in model.named_parameters()]
    head = head_parameter_names(model)
    if linear_probe:
        return {n for n in names if n not in head}
    if frozen_blocks <= 0:
        return set()
    ids = layer_ids(model)
    if not ids:
        raise ValueError(
            f"{type(model).__name__} has no group_matcher, so blocks cannot be frozen by count"
        )
    blocks = max(ids.values()) - 1  # ids: stem 0, blocks 1..n, head n + 1
    if frozen_blocks > blocks:
        raise ValueError(f"frozen_blocks {frozen_blocks} is more than the model's {blocks} blocks")
    return {n for n in names if n not in head and ids.get(n, 10**9) <= frozen_blocks}


def apply_freeze(model: nn.Module, frozen_blocks: int = 0, linear_probe: bool = False) -> set[str]:
    """Set `requires_grad` so that exactly the frozen set is frozen; returns that set."""
    frozen = frozen_parameter_names(model, frozen_blocks, linear_probe)
    for name, param in model.named_parameters():
        param.requires_grad_(name not in frozen)
    return frozen


def frozen_blocks_at(epoch: int, frozen_blocks: int, schedule: dict[int, int]) -> int:
    """Blocks still frozen at `epoch`: the latest schedule entry at or before it, else the start value."""
    current = frozen_blocks
    for start in sorted(schedule):
        if start <= epoch:
            current = schedule[start]
    return current
