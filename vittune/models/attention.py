"""Where a ViT looks: the class token's attention in the last block, and attention rollout.

timm computes attention with `F.scaled_dot_product_attention` when fused attention is on,
and then the attention weights never exist as a tensor. For the capture only, each attention
module is switched to timm's own unfused path (its `fused_attn` flag, restored afterwards),
whose `attn_drop` module receives the softmaxed weights; a forward hook reads them there.
timm's `AttentionExtract` does the same hooking but leaves the fused path on (and an fx trace
of a whole model per call); the flag switch and the maths below are written here.

Rollout follows Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers": per
block, fuse the heads (mean, max or min), optionally drop the weakest weights, add the
identity for the residual path, renormalise rows, and multiply through the blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vittune.errors import RecipeError

HEAD_FUSIONS = ("mean", "max", "min")


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention modules of a timm ViT, in block order (those with timm's attn_drop)."""
    found = [
        m
        for m in model.modules()
        if hasattr(m, "fused_attn") and isinstance(getattr(m, "attn_drop", None), nn.Module)
    ]
    if not found:
        raise RecipeError(
            f"{type(model).__name__} has no timm self-attention blocks to read; attention maps"
            " need a ViT-style model (vit_*, deit_*, eva*, ...)"
        )
    return found


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """timm's explicit softmax path on every attention module, for the duration only."""
    modules = attention_modules(model)
    saved = [m.fused_attn for m in modules]
    try:
        for m in modules:
            m.fused_attn = False
        yield
    finally:
        for m, value in zip(modules, saved, strict=True):
            m.fused_attn = value


@torch.no_grad()
def capture_attention(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Attention weights of every block, each [B, H, N, N] (rows sum to 1), in block order."""
    captured: list[torch.Tensor] = []
    modules = attention_modules(model)
    hooks = [
        m.attn_drop.register_forward_hook(lambda _m, _inp, out: captured.append(out.detach()))
        for m in modules
    ]
    try:
        with unfused_attention(model):
            model(images)
    finally:
        for hook in hooks:
            hook.remove()
    if len(captured) != len(modules):
        raise RuntimeError(f"captured {len(captured)} attention maps for {len(modules)} blocks")
    return captured


def prompt_tokens(model: nn.Module) -> int:
    """Learned prompt tokens inside the blocks (unmerged VPT), 0 for any other model."""
    from vittune.models.adapters.vpt import PROMPT  # noqa: PLC0415

    prompt = getattr(model.blocks[0], PROMPT, None) if hasattr(model, "blocks") else None
    return int(prompt.shape[1]) if prompt is not None else 0


def token_layout(model: nn.Module) -> tuple[int, tuple[int, int]]:
    """(prefix tokens: class, distillation and register tokens; the patch grid (rows, cols))."""
    if getattr(model, "cls_token", None) is None:
        raise RecipeError(
            f"{type(model).__name__} has no class token, so it has no class-token attention"
        )
    grid = tuple(int(g) for g in model.patch_embed.grid_size)
    # VPT-deep prompts sit after the prefix tokens inside every block (models/adapters/vpt.py)
    return int(model.num_prefix_tokens) + prompt_tokens(model), grid


def class_token_attention(
    attention: torch.Tensor, num_prefix: int, grid: tuple[int, int]
) -> torch.Tensor:
    """The class token's attention to each patch, [B, H, rows, cols], from one block's
    [B, H, N, N] weights; prefix tokens (distillation, registers) are left out of the map."""
    b, h = attention.shape[:2]
    return attention[:, :, 0, num_prefix:].reshape(b, h, *grid)  # [B, H, rows, cols]


def fuse_heads(attention: torch.Tensor, fusion: str) -> torch.Tensor:
    """[B, H, N, N] -> [B, N, N] by the mean, max or min over heads."""
    if fusion == "mean":
        return attention.mean(dim=1)
    if fusion == "max":
        return attention.amax(dim=1)
    if fusion == "min":
        return attention.amin(dim=1)
    raise RecipeError(f"head fusion must be one of {', '.join(HEAD_FUSIONS)}, got {fusion!r}")


def attention_rollout(
    attentions: list[torch.Tensor],
    num_prefix: int,
    grid: tuple[int, int],
    fusion: str = "mean",
    discard_ratio: float = 0.0,
) -> torch.Tensor:
    """Rollout of the class token over the patches, [B, rows, cols], scaled to max 1.

    Args:
        attentions: every block's [B, H, N, N] weights, first block first.
        num_prefix: leading non-patch tokens (class first).
        grid: patch rows and columns.
        fusion: how heads are combined in each block.
        discard_ratio: share of each row's weakest weights set to 0 before the identity is
            added (the class token's own column is kept), to sharpen the map.
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise RecipeError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    first = attentions[0]
    b, n = first.shape[0], first.shape[-1]
    eye = torch.eye(n, dtype=torch.float64, device=first.device)
    joint = eye.expand(b, n, n)  # [B, N, N]
    for attention in attentions:
        fused = fuse_heads(attention.double(), fusion)  # [B, N, N]
        if discard_ratio > 0:
            drop = int(n * discard_ratio)
            weakest = fused.topk(drop, dim=-1, largest=False).indices  # [B, N, drop]
            keep = torch.ones_like(fused).scatter_(-1, weakest, 0.0)
            keep[..., 0] = 1.0  # attention to the class token always flows
            fused = fused * keep
        mixed = (fused + eye) / 2  # the residual connection carries the token itself
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)
        joint = mixed @ joint  # [B, N, N]: later blocks act on earlier ones' mixture
    spatial = joint[:, 0, num_prefix:].reshape(b, *grid)  # [B, rows, cols]
    return (spatial / spatial.amax(dim=(-2, -1), keepdim=True)).float()


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, (H,) rows, cols] -> the same at the image size (bilinear), each scaled to [0, 1]."""
    squeeze = maps.dim() == 3
    x = maps.unsqueeze(1) if squeeze else maps  # [B, C, rows, cols]
    x = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False)
    low = x.amin(dim=(-2, -1), keepdim=True)
    high = x.amax(dim=(-2, -1), keepdim=True)
    x = (x - low) / (high - low).clamp_min(1e-12)
    return x[:, 0] if squeeze else x


def attention_maps(
    model: torch.nn.Module, images: torch.Tensor, fusion: str = "mean", discard_ratio: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(class-token attention of the last block [B, H, h, w], rollout [B, h, w]), both in [0, 1]
    at the image size."""
    was_training = model.training
    model.eval()
    try:
        attentions = capture_attention(model, images)
    finally:
        model.train(was_training)
    num_prefix, grid = token_layout(model)
    size = tuple(images.shape[-2:])
    heads = upsample(class_token_attention(attentions[-1], num_prefix, grid), size)
    rollout = upsample(attention_rollout(attentions, num_prefix, grid, fusion, discard_ratio), size)
    return heads, rollout
