"""Which timm modules an adapter wraps: explicit full names, never a suffix match.

peft matches a bare suffix such as "proj" against every module name, which catches
`patch_embed.proj`, and its "all-linear" shortcut catches a timm head; so the recipe's
targets (names inside a block, e.g. `attn.qkv`) are expanded here to `blocks.N.attn.qkv`
for every block, and each one is checked to exist.
"""

from __future__ import annotations

import difflib

from torch import nn

from vittune.errors import RecipeError
from vittune.models.freezing import head_parameter_names


def vit_blocks(model: nn.Module) -> nn.Module:
    """The model's transformer blocks (timm ViTs, DeiT, EVA keep them as `blocks`)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList) or len(blocks) == 0:
        raise RecipeError(
            f"peft needs a ViT with transformer blocks (model.blocks); {type(model).__name__}"
            " has none: set peft.method: none or pick a ViT"
        )
    return blocks


def target_names(model: nn.Module, targets: list[str]) -> list[str]:
    """`["attn.qkv", ...]` -> `["blocks.0.attn.qkv", ..., "blocks.{depth-1}.mlp.fc2"]`."""
    blocks = vit_blocks(model)
    inside = {name for name, _ in blocks[0].named_modules() if name}
    for target in targets:
        if target not in inside:
            linears = sorted(n for n, m in blocks[0].named_modules() if isinstance(m, nn.Linear))
            guess = difflib.get_close_matches(target, linears, n=1)
            hint = f"did you mean {guess[0]!r}? " if guess else ""
            raise RecipeError(
                f"peft.targets: {target!r} is not a module of {type(model).__name__}'s blocks;"
                f" {hint}its linear layers are {linears}"
            )
    return [f"blocks.{i}.{t}" for i in range(len(blocks)) for t in targets]


def head_names(model: nn.Module) -> set[str]:
    """Parameter names of the classifier head(s) (`head`, a DeiT's `head_dist`): trained in full."""
    return head_parameter_names(model)
