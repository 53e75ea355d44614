"""Pure functions that move weights between model geometries and heads.

Each one takes and returns plain tensors / state dicts and is tested against timm.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models import adapt_input_conv
from torch import nn

from vittune.errors import WeightsError


def grid_of(model: nn.Module) -> tuple[int, int] | None:
    """The (rows, cols) token grid of a ViT-like model, or None for CNNs."""
    patch_embed = getattr(model, "patch_embed", None)
    grid = getattr(patch_embed, "grid_size", None)
    return tuple(int(g) for g in grid) if grid is not None else None


def prefix_tokens_in_pos_embed(model: nn.Module) -> int:
    """How many leading pos-embed rows belong to cls/dist/register tokens (kept as they are)."""
    if getattr(model, "no_embed_class", False):
        return 0
    return int(getattr(model, "num_prefix_tokens", 1))


def resample_pos_embed(
    state: dict[str, torch.Tensor], model: nn.Module, old_grid: tuple[int, int] | None = None
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Resample `state['pos_embed']` to the model's grid with timm's `resample_abs_pos_embed`.

    We call it ourselves (rather than relying on timm's checkpoint filters) because the
    filters infer a square source grid and compare token counts only; vittune exports
    record their true grid, so non-square sources and equal-count grids resample right.
    Returns the new state and a note (None when nothing changed).
    """
    new_grid = grid_of(model)
    if "pos_embed" not in state or new_grid is None or not hasattr(model, "pos_embed"):
        return state, None
    posemb = state["pos_embed"]  # [1, prefix + rows * cols, D]
    prefix = prefix_tokens_in_pos_embed(model)
    n_patches = posemb.shape[1] - prefix
    if old_grid is None or old_grid[0] * old_grid[1] != n_patches:
        side = int(math.isqrt(n_patches))
        if side * side != n_patches:
            raise WeightsError(
                f"pos_embed has {n_patches} patch positions, not a square grid; export the weights with vittune so their grid is recorded"
            )
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid) and posemb.shape == model.pos_embed.shape:
        return state, None
    resampled = resample_abs_pos_embed(
        posemb, new_size=list(new_grid), old_size=list(old_grid), num_prefix_tokens=prefix
    )
    state = {**state, "pos_embed": resampled}
    return (
        state,
        f"pos_embed resampled {old_grid[0]}x{old_grid[1]} -> {new_grid[0]}x{new_grid[1]} tokens",
    )


def resample_patch_embedding(
    state: dict[str, torch.Tensor], model: nn.Module, key: str = "patch_embed.proj.weight"
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Resample the patch-embedding kernel to the model's patch size (FlexiViT, via timm)."""
    if key not in state or not hasattr(model, "patch_embed"):
        return state, None
    target = model.patch_embed.proj.weight  # [D, C, ph, pw]
    kernel = state[key]
    if kernel.shape[-2:] == target.shape[-2:]:
        return state, None
    resampled = resample_patch_embed(kernel, new_size=list(target.shape[-2:]))
    note = f"patch embedding resampled {tuple(kernel.shape[-2:])} -> {tuple(target.shape[-2:])}"
    return {**state, key: resampled}, note


def adapt_input_channels(
    state: dict[str, torch.Tensor], model: nn.Module, first_conv: str
) -> tuple[dict[str, torch.Tensor], str | None]:
    """Adapt the first convolution to the model's input channels as timm does (sum or repeat)."""
    key = f"{first_conv}.weight"
    if key not in state:
        return state, None
    weight = state[key]  # [D, C, kh, kw]
    wanted = model.get_submodule(first_conv).weight.shape[1]
    if weight.shape[1] == wanted:
        return state, None
    adapted = adapt_input_conv(wanted, weight)
    return {
        **state,
        key: adapted,
    }, f"input channels adapted {weight.shape[1]} -> {wanted} ({first_conv})"


def classifier_keys(model: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """State-dict keys of the classifier head(s) named by the model's pretrained config."""
    names = (
        model.pretrained_cfg.get("classifier", "head")
        if hasattr(model, "pretrained_cfg")
        else "head"
    )
    names = (names,) if isinstance(names, str) else tuple(names)
    return sorted(k for k in state if any(k.startswith(f"{n}.") for n in names))


def head_matches(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    keys = classifier_keys(model, state)
    return bool(keys) and all(k in own and own[k].shape == state[k].shape for k in keys)


def init_head(model: nn.Module, how: str = "trunc_normal") -> None:
    """Re-initialise every classifier layer: truncated normal (std 0.02, as timm) or zeros."""
    names = model.pretrained_cfg.get("classifier", "head")
    names = (names,) if isinstance(names, str) else tuple(names)
    for name in names:
        try:
            head = model.get_submodule(name)
        except AttributeError:
            continue
        for module in head.modules():
            if isinstance(module, nn.Linear | nn.Conv2d):
                if how == "zeros":
                    nn.init.zeros_(module.weight)
                else:
                    nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def check_load_keys(
    missing: Iterable[str], unexpected: Iterable[str], reinitialised: Iterable[str]
) -> None:
    """After a partial load, the missing keys must be exactly the ones meant to be re-initialised."""
    missing, unexpected, expected = set(missing), set(unexpected), set(reinitialised)
    surprise_missing = sorted(missing - expected)
    problems = []
    if surprise_missing:
        problems.append(
            f"missing {surprise_missing[:8]}{' ...' if len(surprise_missing) > 8 else ''}"
        )
    if unexpected:
        extra = sorted(unexpected)
        problems.append(f"unexpected {extra[:8]}{' ...' if len(extra) > 8 else ''}")
    if problems:
        raise WeightsError(
            "weights do not fit model.name: "
            + "; ".join(problems)
            + "; check model.name/model.kwargs match the weights"
        )
