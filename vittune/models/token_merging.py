"""Token merging at inference (ToMe, Bolya et al. 2023) for timm ViTs: r fewer tokens per block.

In every block, between attention and the MLP, the patch tokens are split alternately into
two sets; each token of the first set is matched to its most similar token of the second (by
the cosine similarity of its attention keys, averaged over heads), and the r best-matched
pairs are merged by a size-weighted average. Attention then counts a merged token by the
number of patches it holds (proportional attention: log(size) is added to the logits).

timm has no token merging and the paper's code patches timm classes in place; this is a
written-from-the-paper version that swaps one ViT's `forward_features` for the duration of a
`with token_merging(model, r):` block. Prefix tokens (class, distillation, registers) are
never merged and keep their positions, so timm's heads read them as usual.

Supported: timm `VisionTransformer` (and the distilled DeiT) built of plain `Block`s with
`Attention`, and class-token pooling. Others are refused with a one-line message: average
pooling would need size-weighted pooling, and other block types (EVA's rotary embeddings,
parallel or post-norm blocks) compute attention differently.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vittune.errors import RecipeError


def check_supported(model: nn.Module) -> None:
    """Refuse, in one line, a model this implementation would merge incorrectly."""
    name = type(model).__name__
    if not isinstance(model, VisionTransformer):
        raise RecipeError(
            f"token merging needs a timm VisionTransformer (vit_*, deit_*), not {name}"
        )
    if getattr(model, "global_pool", "token") != "token" or model.attn_pool is not None:
        raise RecipeError(
            f"token merging needs class-token pooling; this {name} pools with"
            f" {model.global_pool!r}, which would need size-weighted pooling"
        )
    for block in model.blocks:
        if block._forward_hooks or block._forward_pre_hooks:  # VPT-deep prompts (adapters/vpt)
            raise RecipeError(
                "token merging runs the blocks' parts itself and would skip the prompts a"
                " peft.method: vpt_deep run adds to each block; score it without --token-merge"
            )
        if type(block) is not Block or type(block.attn) is not Attention:
            raise RecipeError(
                f"token merging supports timm's plain ViT blocks; {type(block).__name__} with"
                f" {type(block.attn).__name__} computes attention differently"
            )
        if getattr(block.attn, "gate", None) is not None:
            raise RecipeError("token merging does not support gated attention")


def attention_with_keys(
    attn: Attention, x: torch.Tensor, size: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """timm's `Attention` with proportional attention; also returns the keys' mean over heads.

    x [B, N, C], size [B, N, 1] patches per token -> (output [B, N, C], keys [B, N, C / H]).
    """
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # [B, H, N, d] each
    q, k = attn.q_norm(q), attn.k_norm(k)
    bias = size.log()[:, None, None, :, 0]  # [B, 1, 1, N]: a token counts as its patches
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # [B, H, N, d]
    out = out.transpose(1, 2).reshape(b, n, attn.attn_dim)
    out = attn.proj_drop(attn.proj(attn.norm(out)))
    return out, k.mean(dim=1)  # [B, N, C], [B, N, d]


def bipartite_merge(
    x: torch.Tensor, size: torch.Tensor, keys: torch.Tensor, r: int, prefix: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge r pairs of patch tokens (never prefix tokens); x [B, N, C], size [B, N, 1]."""
    head, patches = x[:, :prefix], x[:, prefix:]  # [B, P, C], [B, M, C]
    head_size, sizes = size[:, :prefix], size[:, prefix:]
    metric = F.normalize(keys[:, prefix:], dim=-1)  # [B, M, d]
    r = min(r, patches.shape[1] // 2)
    if r <= 0:
        return x, size
    a, b = metric[:, ::2], metric[:, 1::2]  # alternate split: [B, Ma, d], [B, Mb, d]
    scores = a @ b.transpose(-1, -2)  # [B, Ma, Mb] cosine similarities
    best, match = scores.max(dim=-1)  # [B, Ma] each A token's best B partner
    order = best.argsort(dim=-1, descending=True)  # [B, Ma]
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values  # kept in original order
    target = match.gather(1, merged)  # [B, r] where each merged A token goes

    def combine(values: torch.Tensor) -> torch.Tensor:  # [B, M, D] -> [B, M - r, D]
        src, dst = values[:, ::2], values[:, 1::2]
        d = values.shape[-1]
        stay = src.gather(1, kept[..., None].expand(-1, -1, d))  # [B, Ma - r, D]
        move = src.gather(1, merged[..., None].expand(-1, -1, d))  # [B, r, D]
        dst = dst.scatter_add(1, target[..., None].expand(-1, -1, d), move)  # [B, Mb, D]
        return torch.cat([stay, dst], dim=1)

    weighted = combine(patches * sizes)  # sums of size-weighted tokens
    new_sizes = combine(sizes)
    return torch.cat([head, weighted / new_sizes], 1), torch.cat([head_size, new_sizes], 1)


def merged_block(block: Block, x: torch.Tensor, size: torch.Tensor, r: int, prefix: int):
    """One timm `Block` with merging between attention and MLP: (x, size) with r fewer tokens."""
    out, keys = attention_with_keys(block.attn, block.norm1(x), size)
    x = x + block.drop_path1(block.ls1(out))
    x, size = bipartite_merge(x, size, keys, r, prefix)
    x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
    return x, size


def merged_features(model: VisionTransformer, images: torch.Tensor, r: int) -> torch.Tensor:
    """`forward_features` with r tokens merged in every block: [B, P + M - depth * r, C]."""
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(images))))
    size = torch.ones_like(x[..., :1])  # [B, N, 1]
    for block in model.blocks:
        x, size = merged_block(block, x, size, r, model.num_prefix_tokens)
    return model.norm(x)


@contextmanager
def token_merging(model: nn.Module, r: int) -> Iterator[nn.Module]:
    """Merge r tokens per block while inside the block; r = 0 leaves the model untouched."""
    if r < 0:
        raise RecipeError(f"--token-merge r must be >= 0, got {r}")
    if r == 0:
        yield model
        return
    check_supported(model)
    model.forward_features = types.MethodType(
        lambda self, x, **_: merged_features(self, x, r), model
    )
    try:
        yield model
    finally:
        del model.forward_features  # the class's own method again


def tokens_left(num_patches: int, depth: int, r: int) -> int:
    """Patch tokens after every block has merged min(r, half of what is left)."""
    for _ in range(depth):
        num_patches -= min(r, num_patches // 2)
    return num_patches
