"""Masked autoencoding (He et al. 2021) around an unmodified timm ViT encoder.

Masking, patchify and the loss are plain functions, each tested against the paper's
formulation; `MaeDecoder` is the light decoder that only pretraining needs. The encoder
stays a stock timm `VisionTransformer`, so its weights export under timm key names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.layers import LayerNorm, build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from vittune.errors import RecipeError
from vittune.recipe.schema import MaeConfig

NORM_PIX_EPS = 1e-6  # as in the paper's code: keeps flat (e.g. black) patches finite


def check_encoder(encoder: nn.Module) -> None:
    """MAE needs a timm ViT with an absolute position embedding (it masks before the blocks)."""
    if not isinstance(encoder, VisionTransformer):
        raise RecipeError(
            f"MAE pretraining needs a timm VisionTransformer (vit_*, deit_*), not {type(encoder).__name__}; change model.name"
        )
    if getattr(encoder, "pos_embed", None) is None:
        raise RecipeError(
            "MAE pretraining needs an absolute position embedding; drop pos_embed/rope settings from model.kwargs"
        )
    patch = tuple(encoder.patch_embed.patch_size)
    if patch[0] != patch[1]:
        raise RecipeError(
            f"MAE pretraining needs square patches, got {patch}; set model.patch_size"
        )


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Tokens each sample keeps: round(N x (1 - mask_ratio)), at least one kept and one masked."""
    keep = round(num_patches * (1.0 - mask_ratio))
    if not 0 < keep < num_patches:
        raise RecipeError(
            f"mae.mask_ratio {mask_ratio} keeps {keep} of {num_patches} patches; pick a ratio that keeps some and masks some"
        )
    return keep


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches in row-major order, pixels (row, col, channel)."""
    b, c, h, w = images.shape
    rows, cols = h // patch_size, w // patch_size
    x = images.reshape(b, c, rows, patch_size, cols, patch_size)  # [B, C, r, p, c, q]
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, r, c, p, q, C]
    return x.reshape(b, rows * cols, patch_size * patch_size * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int
) -> torch.Tensor:
    """Inverse of `patchify`: [B, N, p*p*C] -> [B, C, H, W]."""
    b = patches.shape[0]
    rows, cols = grid
    x = patches.reshape(b, rows, cols, patch_size, patch_size, channels)  # [B, r, c, p, q, C]
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, r, p, c, q]
    return x.reshape(b, channels, rows * patch_size, cols * patch_size)


@dataclass
class Masking:
    """Which patches a sample keeps; `mask` is 1 where a patch is removed (the loss's support)."""

    ids_keep: torch.Tensor  # [B, K] indices of visible patches, in shuffled order
    ids_restore: torch.Tensor  # [B, N] position of each patch in the shuffled order
    mask: torch.Tensor  # [B, N] 0 visible, 1 masked, in the original patch order


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    device: torch.device | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Masking:
    """Per-sample random subset of patches: sort uniform noise, keep the K smallest."""
    keep = num_visible(num_patches, mask_ratio)
    if noise is None:
        noise = torch.rand(batch, num_patches, device=device, generator=generator)  # [B, N]
    ids_shuffle = torch.argsort(noise, dim=1)  # [B, N] ascending: small noise is kept
    ids_restore = torch.argsort(ids_shuffle, dim=1)  # [B, N]
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # [B, N] back to the original patch order
    return Masking(ids_shuffle[:, :keep], ids_restore, mask)


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, D], ids [B, K] -> [B, K, D]."""
    return torch.gather(tokens, 1, ids.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))


def sincos_pos_embed(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding [rows * cols, dim] (timm's builder, the paper's bands).

    The paper's code orders the four quarter-bands (w sin, w cos, h sin, h cos); timm's
    (h sin, w sin, h cos, w cos). They differ by a fixed permutation of the embedding
    channels, which the learned layers absorb: both define the same family of models.
    """
    if dim % 4:
        raise RecipeError(
            f"a 2-D sin-cos position embedding needs a width divisible by 4, got {dim}; set mae.pos_embed: learned"
        )
    return build_sincos2d_pos_embed(list(grid), dim)  # [N, D]


@torch.no_grad()
def freeze_sincos_pos_embed(encoder: VisionTransformer) -> None:
    """Write the fixed sin-cos table into the encoder's `pos_embed` and stop it training.

    Writing it into the timm parameter (prefix rows zero, as the paper does for the class
    token) means the exported encoder carries it, and fine-tuning can train it from there.
    """
    pos = encoder.pos_embed  # [1, P + N, D] or [1, N, D] when no_embed_class
    table = sincos_pos_embed(tuple(encoder.patch_embed.grid_size), pos.shape[-1])
    prefix = pos.shape[1] - table.shape[0]
    pos.zero_()
    pos[0, prefix:] = table.to(pos.dtype)
    pos.requires_grad_(False)


# Encoder parts the masked forward runs through; anything else (pooling norm, attention pool,
# head) gets no gradient in pretraining and is frozen so that DDP sees no unused parameters.
PREFIX_PARAMS = ("cls_token", "reg_token", "dist_token", "pos_embed")
ENCODER_PARTS = (*PREFIX_PARAMS, "patch_embed", "norm_pre", "blocks", "norm")


def freeze_unused_encoder_parts(encoder: nn.Module) -> list[str]:
    """Stop training encoder parameters that MAE never uses (e.g. `fc_norm`); returns their names."""
    frozen = []
    for name, param in encoder.named_parameters():
        if name.split(".")[0] not in ENCODER_PARTS and param.requires_grad:
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def encode_visible(
    encoder: VisionTransformer, images: torch.Tensor, masking: Masking
) -> torch.Tensor:
    """Run the encoder on the visible patches only: [B, C, H, W] -> [B, P + K, D].

    timm's `_pos_embed` adds position embeddings and prepends the prefix tokens (class,
    register, distillation) for every layout timm supports (`no_embed_class`, dynamic
    sizes); adding is per token, so dropping masked tokens afterwards is the same as
    never embedding them, and the blocks still see only P + K tokens.
    """
    x = encoder.patch_embed(images)  # [B, N, D] (or [B, h, w, D] with dynamic_img_size)
    x = encoder._pos_embed(x)  # [B, P + N, D]
    # encoder.patch_drop (PatchDropout) is skipped on purpose: masking takes its place.
    prefix = encoder.num_prefix_tokens
    visible = gather_tokens(x[:, prefix:], masking.ids_keep)  # [B, K, D]
    x = torch.cat([x[:, :prefix], visible], dim=1)  # [B, P + K, D]
    x = encoder.norm_pre(x)
    x = encoder.blocks(x)
    return encoder.norm(x)


class MaeDecoder(nn.Module):
    """Light transformer decoder: mask tokens fill the gaps, timm blocks, a per-patch pixel head."""

    def __init__(
        self,
        encoder_dim: int,
        grid: tuple[int, int],
        num_prefix_tokens: int,
        patch_size: int,
        in_chans: int,
        depth: int = 8,
        dim: int = 512,
        heads: int = 16,
        mlp_ratio: float = 4.0,
        learned_pos_embed: bool = False,
    ) -> None:
        super().__init__()
        if dim % heads:
            raise RecipeError(
                f"mae.decoder_dim {dim} is not divisible by mae.decoder_heads {heads}; pick a multiple"
            )
        self.grid = tuple(grid)
        self.num_prefix_tokens = num_prefix_tokens
        num_patches = self.grid[0] * self.grid[1]
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_prefix_tokens + num_patches, dim), requires_grad=learned_pos_embed
        )
        self.blocks = nn.Sequential(
            *[
                Block(dim, heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm)
                for _ in range(depth)
            ]
        )
        self.norm = LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_size * patch_size * in_chans)
        self.init_weights(learned_pos_embed)

    @torch.no_grad()
    def init_weights(self, learned_pos_embed: bool) -> None:
        """The paper's init: xavier-uniform linears, N(0, 0.02) mask token and learned positions."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):  # timm's LayerNorm subclasses torch's
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.mask_token, std=0.02)
        if learned_pos_embed:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            self.pos_embed[0, self.num_prefix_tokens :] = sincos_pos_embed(
                self.grid, self.pos_embed.shape[-1]
            )

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, P + K, De], ids_restore [B, N] -> predicted patches [B, N, p*p*C]."""
        x = self.embed(latent)  # [B, P + K, Dd]
        prefix, visible = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        b, n = ids_restore.shape
        fill = self.mask_token.expand(b, n - visible.shape[1], -1)  # [B, N - K, Dd]
        shuffled = torch.cat([visible, fill], dim=1)  # [B, N, Dd] in shuffled order
        patches = gather_tokens(shuffled, ids_restore)  # [B, N, Dd] in patch order
        x = torch.cat([prefix, patches], dim=1) + self.pos_embed  # [B, P + N, Dd]
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.num_prefix_tokens :])  # [B, N, p*p*C]


def patch_targets(images: torch.Tensor, patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    """Pixel targets [B, N, p*p*C], optionally normalised per patch (mean 0, unbiased var 1)."""
    target = patchify(images, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS).sqrt()
    return target


def reconstruction_loss(
    images: torch.Tensor,
    pred: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix_loss: bool,
) -> torch.Tensor:
    """Mean squared error per patch, averaged over the masked patches only."""
    target = patch_targets(images, patch_size, norm_pix_loss)  # [B, N, p*p*C]
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [B, N]
    return (per_patch * mask).sum() / mask.sum()


@dataclass
class MaeOutput:
    loss: torch.Tensor
    pred: torch.Tensor  # [B, N, p*p*C]
    masking: Masking


class MaskedAutoencoder(nn.Module):
    """Encoder + decoder as one module: for the optimiser's parameter groups and benchmarks.

    The task keeps the encoder and decoder as separate attributes (the encoder alone is
    exported) and builds this view over them; it owns no parameters of its own.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        decoder: MaeDecoder,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.patch_size = int(encoder.patch_embed.patch_size[0])

    def no_weight_decay(self) -> set[str]:
        """The encoder's own list (positions, tokens) under its prefix, plus the decoder's tokens."""
        own = {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
        return own | {"decoder.mask_token", "decoder.pos_embed"}

    def forward(
        self,
        images: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> MaeOutput:
        """images [B, C, H, W] -> loss, predictions [B, N, p*p*C] and the masking used."""
        grid = self.encoder.patch_embed.grid_size
        masking = random_masking(
            images.shape[0],
            grid[0] * grid[1],
            self.mask_ratio,
            device=images.device,
            noise=noise,
            generator=generator,
        )
        latent = encode_visible(self.encoder, images, masking)  # [B, P + K, D]
        pred = self.decoder(latent, masking.ids_restore)  # [B, N, p*p*C]
        loss = reconstruction_loss(images, pred, masking.mask, self.patch_size, self.norm_pix_loss)
        return MaeOutput(loss, pred, masking)


def build_decoder(encoder: VisionTransformer, cfg: MaeConfig) -> MaeDecoder:
    """The decoder the recipe's `mae:` section describes, sized to the encoder's token grid."""
    return MaeDecoder(
        encoder_dim=encoder.embed_dim,
        grid=tuple(encoder.patch_embed.grid_size),
        num_prefix_tokens=encoder.num_prefix_tokens,
        patch_size=int(encoder.patch_embed.patch_size[0]),
        in_chans=encoder.patch_embed.proj.in_channels,
        depth=cfg.decoder_depth,
        dim=cfg.decoder_dim,
        heads=cfg.decoder_heads,
        learned_pos_embed=cfg.pos_embed == "learned",
    )
