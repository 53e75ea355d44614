"""Parameter groups: no weight decay on norms, biases, position embedding and tokens; AdamW."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY_VIT

from vittune.optim.param_groups import build_optimizer, build_param_groups
from vittune.recipe.schema import OptimConfig


def tiny_vit() -> torch.nn.Module:
    return timm.create_model(
        TINY_VIT["name"],
        img_size=TINY_VIT["img_size"],
        patch_size=TINY_VIT["patch_size"],
        num_classes=3,
        **TINY_VIT["kwargs"],
    )


def exempt_from_decay(name: str) -> bool:
    """The rule written out by name: biases, LayerNorm scales, and the embeddings/tokens."""
    return (
        name.endswith(".bias")
        or ".norm" in name
        or name.startswith("norm.")
        or name
        in (
            "pos_embed",
            "cls_token",
        )
    )


def group_of(groups: list[dict]) -> dict[str, dict]:
    return {name: g for g in groups for name in g["param_names"]}


def test_no_weight_decay_on_norms_biases_pos_embed_and_tokens() -> None:
    model = tiny_vit()
    groups = build_param_groups(model, OptimConfig(weight_decay=0.05), lr=1e-3)
    by_name = group_of(groups)
    assert set(by_name) == {n for n, _ in model.named_parameters()}  # every parameter, once
    for name, _ in model.named_parameters():
        wanted = 0.0 if exempt_from_decay(name) else 0.05
        assert by_name[name]["weight_decay"] == wanted, name
        assert by_name[name]["lr"] == pytest.approx(1e-3)
    assert by_name["patch_embed.proj.weight"]["weight_decay"] == 0.05
    assert by_name["head.weight"]["weight_decay"] == 0.05


def test_adamw_is_the_default_and_keeps_each_groups_decay() -> None:
    model = tiny_vit()
    config = OptimConfig()
    groups = build_param_groups(model, config, lr=3e-4)
    optimizer = build_optimizer(groups, config, lr=3e-4)
    assert type(optimizer) is torch.optim.AdamW
    decays = sorted({g["weight_decay"] for g in optimizer.param_groups})
    assert decays == [0.0, config.weight_decay]
    assert all(g["lr"] == pytest.approx(3e-4) for g in optimizer.param_groups)
    counted = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    assert counted == sum(p.numel() for p in model.parameters())


def test_layer_decay_is_in_each_groups_real_lr() -> None:
    # ViT layer ids (BEiT/MAE): embeddings 0, blocks 1..depth, head depth + 1. timm's
    # group_matcher puts the final norm with the last block (MAE would give it depth + 1).
    model = tiny_vit()
    depth, decay, lr = 2, 0.5, 1e-3
    by_name = group_of(build_param_groups(model, OptimConfig(layer_decay=decay), lr))
    expected = {
        "cls_token": 0,
        "pos_embed": 0,
        "patch_embed.proj.weight": 0,
        "blocks.0.attn.qkv.weight": 1,
        "blocks.1.mlp.fc2.bias": 2,
        "norm.weight": 2,
        "head.weight": 3,
    }
    for name, layer in expected.items():
        assert by_name[name]["lr"] == pytest.approx(lr * decay ** (depth + 1 - layer)), name


def test_frozen_parameters_get_no_group() -> None:
    model = tiny_vit()
    model.patch_embed.requires_grad_(False)
    names = set(group_of(build_param_groups(model, OptimConfig(), 1e-3)))
    assert not any(n.startswith("patch_embed.") for n in names)
