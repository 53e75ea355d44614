"""Visual Prompt Tuning (Jia et al. 2022), shallow and deep; in neither timm nor peft, so
written here as one parameter per prompted block plus forward hooks on the timm blocks.

As in the paper's reference code, `P` learned tokens enter after the class (and register)
tokens, with no position embedding, initialised uniform in +-sqrt(6 / (C * p * p + D)) (a
patch's fan-in plus the width). Shallow: the tokens enter once, before block 0. Deep: before
every block, each block's input prompts replace what the previous block made of them. After
the last block the prompt tokens are dropped, so norm, pooling and head see the usual tokens.

Each prompt is a parameter of the block it enters (`blocks.N.vpt_prompt`), so timm's
`group_matcher` gives it block N's layer-wise lr scale.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vittune.models.adapters.targets import vit_blocks

PROMPT = "vpt_prompt"


def _insert(n_prefix: int) -> object:
    def hook(block: nn.Module, args: tuple) -> tuple:
        x = args[0]  # [B, n + N, D]
        prompt = getattr(block, PROMPT).expand(x.shape[0], -1, -1)  # [B, P, D]
        return (torch.cat([x[:, :n_prefix], prompt, x[:, n_prefix:]], dim=1), *args[1:])

    return hook


def _replace(n_prefix: int, tokens: int) -> object:
    def hook(block: nn.Module, args: tuple) -> tuple:
        x = args[0]  # [B, n + P + N, D]
        prompt = getattr(block, PROMPT).expand(x.shape[0], -1, -1)  # [B, P, D]
        kept = [x[:, :n_prefix], prompt, x[:, n_prefix + tokens :]]
        return (torch.cat(kept, dim=1), *args[1:])

    return hook


def _drop(n_prefix: int, tokens: int) -> object:
    def hook(block: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        # [B, n + P + N, D] -> [B, n + N, D]
        return torch.cat([output[:, :n_prefix], output[:, n_prefix + tokens :]], dim=1)

    return hook


def prompt_init_bound(model: nn.Module) -> float:
    """The paper's uniform bound: sqrt(6 / (in_chans * patch_h * patch_w + width))."""
    patch = model.patch_embed.patch_size
    chans = model.patch_embed.proj.in_channels
    return math.sqrt(6.0 / (chans * patch[0] * patch[1] + model.embed_dim))


def add_prompts(model: nn.Module, tokens: int, deep: bool) -> nn.Module:
    """Add `tokens` prompts before block 0 (and, deep, every block) in place; rest frozen."""
    blocks = vit_blocks(model)
    for param in model.parameters():
        param.requires_grad_(False)
    n_prefix = model.num_prefix_tokens  # class (+ distillation, + register) tokens
    bound = prompt_init_bound(model)
    ref = model.pos_embed if getattr(model, "pos_embed", None) is not None else model.cls_token
    for i, block in enumerate(blocks):
        if i > 0 and not deep:
            break
        prompt = nn.Parameter(
            torch.empty(1, tokens, model.embed_dim, device=ref.device, dtype=ref.dtype)
        )
        nn.init.uniform_(prompt, -bound, bound)  # [1, P, D]
        block.register_parameter(PROMPT, prompt)
        block.register_forward_pre_hook(_insert(n_prefix) if i == 0 else _replace(n_prefix, tokens))
    blocks[-1].register_forward_hook(_drop(n_prefix, tokens))
    return model


def mergeable(model: nn.Module, deep: bool) -> bool:
    """Shallow prompts on a plain timm ViT are timm register tokens (see `as_register_tokens`)."""
    from timm.models.vision_transformer import VisionTransformer  # noqa: PLC0415

    return not deep and type(model) is VisionTransformer


def as_register_tokens(
    state: dict[str, torch.Tensor], n_prefix: int, no_embed_class: bool
) -> dict[str, torch.Tensor]:
    """Shallow VPT as plain timm weights of a ViT built with `reg_tokens` += P (pure function).

    timm concatenates [cls, reg..., patches] and, unless `no_embed_class`, adds a position
    embedding over all of them; prompts are register tokens whose position rows are zero
    (VPT adds none), and timm's pooling already skips register tokens like VPT drops prompts.
    """
    out = dict(state)
    prompt = out.pop(f"blocks.0.{PROMPT}")  # [1, P, D]
    old = out.get("reg_token")
    out["reg_token"] = prompt if old is None else torch.cat([old, prompt], dim=1)
    if not no_embed_class and "pos_embed" in out:
        pos = out["pos_embed"]  # [1, n + N, D]
        zeros = pos.new_zeros(1, prompt.shape[1], pos.shape[2])  # [1, P, D]
        out["pos_embed"] = torch.cat([pos[:, :n_prefix], zeros, pos[:, n_prefix:]], dim=1)
    return out
