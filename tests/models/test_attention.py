"""Attention maps: captured weights equal a hand computation from the model's own q/k, rollout
equals Abnar & Zuidema's formula written out in numpy, and fused attention changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from vittune.models.attention import (
    attention_maps,
    attention_rollout,
    capture_attention,
    class_token_attention,
    token_layout,
)

TINY = dict(embed_dim=64, depth=3, num_heads=4, num_classes=3)


def tiny_vit(name: str = "vit_tiny_patch16_224", img_size=(32, 48), **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=img_size, patch_size=8, **TINY, **extra).eval()


def attention_by_hand(model: torch.nn.Module, images: torch.Tensor) -> list[np.ndarray]:
    """softmax(q k^T / sqrt(d)) from each block's input, its norm1 and its qkv weights."""
    inputs: list[torch.Tensor] = []
    hooks = [b.register_forward_pre_hook(lambda _m, a: inputs.append(a[0])) for b in model.blocks]
    with torch.no_grad():
        model(images)  # fused attention on: timm never forms the weights itself
        maps = []
        for block, x in zip(model.blocks, inputs, strict=True):
            attn = block.attn
            b, n, _ = x.shape
            qkv = attn.qkv(block.norm1(x)).reshape(b, n, 3, attn.num_heads, -1)
            q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, H, N, d]
            logits = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5  # [B, H, N, N]
            maps.append(logits.double().softmax(dim=-1).numpy())
    for hook in hooks:
        hook.remove()
    return maps


def rollout_by_formula(maps: list[np.ndarray], fusion: str, prefix: int, grid) -> np.ndarray:
    """Abnar & Zuidema (2020): A_l = norm(0.5 W_l + 0.5 I), rollout = A_L ... A_1, class row."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[fusion]
    n = maps[0].shape[-1]
    result = np.stack([np.eye(n)] * maps[0].shape[0])
    for weights in maps:
        a = 0.5 * fuse(weights, axis=1) + 0.5 * np.eye(n)
        a = a / a.sum(axis=-1, keepdims=True)
        result = a @ result
    spatial = result[:, 0, prefix:].reshape(len(result), *grid)
    return spatial / spatial.max(axis=(1, 2), keepdims=True)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_captured_attention_and_rollout_equal_the_written_out_formulas(fusion: str) -> None:
    model = tiny_vit()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    reference = attention_by_hand(model, images)
    captured = capture_attention(model, images)
    for ours, theirs in zip(captured, reference, strict=True):
        np.testing.assert_allclose(ours.double().numpy(), theirs, atol=1e-5)
    prefix, grid = token_layout(model)
    assert (prefix, grid) == (1, (4, 6))  # a non-square grid: 32 x 48 px in 8 px patches
    ours = attention_rollout(captured, prefix, grid, fusion).numpy()
    np.testing.assert_allclose(ours, rollout_by_formula(reference, fusion, prefix, grid), atol=1e-5)
    cls = class_token_attention(captured[-1], prefix, grid)
    np.testing.assert_allclose(
        cls.numpy(), reference[-1][:, :, 0, 1:].reshape(2, 4, 4, 6), atol=1e-5
    )


def test_fused_and_unfused_attention_give_the_same_maps_and_the_model_is_left_as_it_was() -> None:
    fused = tiny_vit()
    timm.layers.set_fused_attn(False)
    try:
        unfused = tiny_vit()  # the same seed: the same weights, built on timm's explicit path
    finally:
        timm.layers.set_fused_attn(True)
    assert fused.blocks[0].attn.fused_attn and not unfused.blocks[0].attn.fused_attn
    images = torch.randn(3, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = fused(images)
    heads_a, rollout_a = attention_maps(fused, images)
    heads_b, rollout_b = attention_maps(unfused, images)
    torch.testing.assert_close(heads_a, heads_b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(rollout_a, rollout_b, atol=1e-5, rtol=1e-4)
    assert all(b.attn.fused_attn for b in fused.blocks)  # switched back after the capture
    with torch.no_grad():
        torch.testing.assert_close(fused(images), before)
    assert heads_a.shape == (3, 4, 32, 48) and rollout_a.shape == (3, 32, 48)
    assert float(rollout_a.amin()) >= 0.0 and float(rollout_a.amax()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("name", "extra", "prefix"),
    [
        ("deit_tiny_distilled_patch16_224", {}, 2),  # class + distillation token
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),  # class + 4 registers
    ],
)
def test_distillation_and_register_tokens_stay_out_of_the_spatial_map(
    name: str, extra: dict, prefix: int
) -> None:
    model = tiny_vit(name, **extra)
    images = torch.randn(1, 3, 32, 48)
    assert token_layout(model) == (prefix, (4, 6))
    captured = capture_attention(model, images)
    assert captured[0].shape[-1] == prefix + 24
    cls = class_token_attention(captured[-1], prefix, (4, 6))  # [1, H, 4, 6]
    np.testing.assert_allclose(
        cls.flatten(2).numpy(), captured[-1][:, :, 0, prefix:].numpy(), atol=0
    )


def test_discarding_weak_weights_keeps_the_class_token_and_sharpens() -> None:
    model = tiny_vit()
    captured = capture_attention(model, torch.randn(1, 3, 32, 48))
    plain = attention_rollout(captured, 1, (4, 6))
    sharp = attention_rollout(captured, 1, (4, 6), discard_ratio=0.9)
    assert sharp.shape == plain.shape and torch.isfinite(sharp).all()
    assert float((sharp < 0.05).sum()) > float((plain < 0.05).sum())


def test_attention_figure_is_readable_with_a_colour_bar(tmp_path) -> None:
    """At least ~800 px wide for three panels (it was 540), with a labelled colour bar."""
    import matplotlib.image as mpimg

    from vittune.evaluation.attention_figures import attention_figure, save_attention_figure

    rng = np.random.default_rng(0)
    pixels, heads, rollout = rng.random((1, 32, 32)), rng.random((2, 32, 32)), rng.random((32, 32))
    fig = attention_figure(pixels, heads, rollout, "t")
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "attention (each map scaled to [0, 1])" in labels
    path = save_attention_figure(pixels, heads, rollout, tmp_path / "a.png", "t")
    height, width = mpimg.imread(path).shape[:2]
    assert width >= 800 and height >= 600


def test_training_time_attention_titles_name_the_true_and_predicted_class(tmp_path) -> None:
    from types import SimpleNamespace

    from vittune.tasks.callbacks import AttentionMaps

    maps = AttentionMaps(tmp_path, 1, (0.5,), (0.5,))
    maps.labels = torch.tensor([2, 0])
    module = SimpleNamespace(classes=["cat", "dog", "fox"])
    outcome = maps._outcome(module, 0, torch.tensor([0.1, 0.7, 0.2]))
    assert outcome == ": true fox, predicted dog (0.70)"
    maps.labels = None  # multi-label targets: nothing to say in one class
    assert maps._outcome(module, 0, torch.tensor([0.1, 0.7, 0.2])) == ""
