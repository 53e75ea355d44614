"""Token merging (ToMe): r = 0 is timm's own forward, merges keep every patch's weight, and
proportional attention makes a merged duplicate act exactly like the pair it replaced."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import ResPostBlock

from vittune.errors import RecipeError
from vittune.models.token_merging import (
    attention_with_keys,
    bipartite_merge,
    merged_features,
    token_merging,
    tokens_left,
)

TINY = dict(img_size=(32, 48), patch_size=8, embed_dim=64, depth=3, num_heads=4, num_classes=3)


def tiny(name: str = "vit_tiny_patch16_224", **extra) -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **TINY, **extra).eval()


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("vit_tiny_patch16_224", {}),
        ("deit_tiny_distilled_patch16_224", {}),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}),
    ],
)
@torch.no_grad()
def test_r_zero_is_timms_forward_and_merging_leaves_prefix_tokens_in_place(name, extra) -> None:
    model = tiny(name, **extra)
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(merged_features(model, images, 0), model.forward_features(images))
    before = model(images)
    with token_merging(model, 0):
        torch.testing.assert_close(model(images), before, atol=0, rtol=0)
    with token_merging(model, 4):
        features = model.forward_features(images)
        merged = model(images)
    assert (
        features.shape[1]
        == model.num_prefix_tokens + tokens_left(24, 3, 4)
        == (model.num_prefix_tokens + 12)
    )
    assert merged.shape == before.shape and not torch.equal(merged, before)
    torch.testing.assert_close(model(images), before, atol=0, rtol=0)  # the class method again


def test_a_merge_is_the_size_weighted_mean_and_keeps_every_patch_counted() -> None:
    # Prefix token 0, then patches p0..p3: A = {p0, p2}, B = {p1, p3}. p2's key equals p3's,
    # so with r = 1 exactly p2 goes into p3.
    keys = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, 1.0]]])
    x = torch.arange(10, dtype=torch.float).reshape(1, 5, 2)
    size = torch.tensor([[[1.0], [1.0], [2.0], [3.0], [1.0]]])
    merged, new_size = bipartite_merge(x, size, keys, r=1, prefix=1)
    # order: prefix, A tokens kept (p0), then B tokens (p1, p3 <- p2)
    assert new_size.flatten().tolist() == [1.0, 1.0, 2.0, 4.0]
    assert float(new_size.sum()) == float(size.sum())
    expected_p3 = (x[0, 3] * 3 + x[0, 4] * 1) / 4
    torch.testing.assert_close(merged[0, 0], x[0, 0])
    torch.testing.assert_close(merged[0, 1], x[0, 1])
    torch.testing.assert_close(merged[0, 2], x[0, 2])
    torch.testing.assert_close(merged[0, 3], expected_p3)


@torch.no_grad()
def test_proportional_attention_makes_a_merged_duplicate_act_like_the_pair() -> None:
    attn = tiny().blocks[0].attn
    tokens = torch.randn(1, 5, 64, generator=torch.Generator().manual_seed(3))
    pair = torch.cat([tokens, tokens[:, 4:5]], dim=1)  # token 4 twice: [1, 6, 64]
    out_pair, _ = attention_with_keys(attn, pair, torch.ones(1, 6, 1))
    size = torch.tensor([[[1.0], [1.0], [1.0], [1.0], [2.0]]])  # token 4 stands for two
    out_merged, _ = attention_with_keys(attn, tokens, size)
    torch.testing.assert_close(out_merged[:, :4], out_pair[:, :4], atol=1e-5, rtol=1e-5)


def test_models_it_would_merge_wrongly_are_refused() -> None:
    with (
        pytest.raises(RecipeError, match="class-token pooling"),
        token_merging(tiny(global_pool="avg"), 2),
    ):
        pass
    post_norm = tiny(block_fn=ResPostBlock)  # a VisionTransformer with other blocks
    with pytest.raises(RecipeError, match="plain ViT blocks"), token_merging(post_norm, 2):
        pass
    eva = timm.create_model(
        "eva02_tiny_patch14_224", img_size=28, embed_dim=64, depth=1, num_heads=2, num_classes=3
    )
    with pytest.raises(RecipeError, match="VisionTransformer"), token_merging(eva, 2):
        pass
    with (
        pytest.raises(RecipeError, match="VisionTransformer"),
        token_merging(timm.create_model("resnet18", num_classes=3), 2),
    ):
        pass
