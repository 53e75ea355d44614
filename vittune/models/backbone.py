"""Creating timm backbones and loading weights into them from any source."""

from __future__ import annotations

import difflib
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from vittune.errors import RecipeError, WeightsError
from vittune.models import surgery
from vittune.models.weights import (
    WeightSource,
    prepare_hub_access,
    read_state_dict,
    resolve_weight_file,
    verify_sha256,
)
from vittune.recipe.schema import ModelConfig


@dataclass
class LoadReport:
    """What happened to the weights, for `vittune inspect` and the run log."""

    source: str = "random init"
    loaded: int = 0
    reinitialised: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    grid_before: tuple[int, int] | None = None
    grid_after: tuple[int, int] | None = None


def create_model(
    name: str,
    num_classes: int,
    img_size: int | tuple[int, int] | None = None,
    patch_size: int | None = None,
    in_chans: int = 3,
    pretrained: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """`timm.create_model` with readable errors; img/patch size only for models that take them."""
    if not timm.is_model(name):
        guess = difflib.get_close_matches(name, timm.list_models(), n=1)
        raise RecipeError(
            f"unknown timm model {name!r}"
            + (f"; did you mean {guess[0]!r}?" if guess else "; see timm.list_models()")
        )
    geometry = {"img_size": img_size, "patch_size": patch_size}
    geometry = {k: v for k, v in geometry.items() if v is not None}
    try:
        return timm.create_model(
            name,
            pretrained=pretrained,
            num_classes=num_classes,
            in_chans=in_chans,
            **geometry,
            **kwargs,
        )
    except TypeError as err:
        if geometry and any(k in str(err) for k in geometry):  # a CNN: no token grid to size
            return timm.create_model(
                name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs
            )
        raise RecipeError(f"model.kwargs are not accepted by {name}: {err}") from None


def hub_grid(name: str, pretrained_cfg: dict[str, Any]) -> tuple[int, int] | None:
    """The token grid hub weights were trained at (their input size over the name's patch size)."""
    match = re.search(r"patch(\d+)", name)
    size = pretrained_cfg.get("input_size")
    if not match or not size:
        return None
    patch = int(match.group(1))
    return (size[1] // patch, size[2] // patch)


def _check_divisible(model: nn.Module, img_size: tuple[int, int]) -> None:
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if patch is None:
        return
    if img_size[0] % patch[0] or img_size[1] % patch[1]:
        raise RecipeError(
            f"model.img_size {img_size} is not divisible by the patch size {tuple(patch)}; use a multiple of {patch[0]}"
        )


def _hub_model(cfg: ModelConfig, num_classes: int, extra: dict[str, Any]) -> nn.Module:
    prepare_hub_access()
    try:
        return create_model(
            cfg.name,
            num_classes,
            cfg.img_size,
            cfg.patch_size,
            cfg.in_chans,
            pretrained=True,
            **extra,
        )
    except (OSError, RuntimeError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise WeightsError(
            f"cannot get hub weights for {cfg.name} ({first}); connect to the internet, pre-fill the HF cache, or set model.pretrained to a local file"
        ) from None


def checkpoint_filter(model: nn.Module):
    """timm's own per-architecture filter (key remaps, patch/pos resampling), if it has one."""
    return getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)


def load_weights(
    model: nn.Module, source: WeightSource, cfg: ModelConfig, report: LoadReport
) -> None:
    """Load a resolved weight file into `model`, resampling geometry and checking keys."""
    verify_sha256(source.path, cfg.pretrained_sha256)
    state = read_state_dict(source.path)
    report.source = str(source.path)
    old_grid = source.config.grid if source.config is not None else None
    if old_grid is None and "pos_embed" in state and surgery.grid_of(model) is not None:
        n_patches = state["pos_embed"].shape[1] - surgery.prefix_tokens_in_pos_embed(model)
        side = int(n_patches**0.5)
        old_grid = (side, side) if side * side == n_patches else None
    report.grid_before = old_grid
    first_conv = model.pretrained_cfg.get("first_conv") or "patch_embed.proj"
    steps = (
        lambda s: surgery.resample_patch_embedding(s, model),
        lambda s: surgery.resample_pos_embed(s, model, old_grid),
        lambda s: surgery.adapt_input_channels(s, model, first_conv),
    )
    for step in steps:
        state, note = step(state)
        if note:
            report.notes.append(note)
    filter_fn = checkpoint_filter(model)
    if filter_fn is not None:
        state = filter_fn(state, model)
    reinit = []
    head_keys = surgery.classifier_keys(model, state)
    if head_keys and not (cfg.keep_head and surgery.head_matches(model, state)):
        state = {k: v for k, v in state.items() if k not in head_keys}
    reinit = [k for k in surgery.classifier_keys(model, model.state_dict()) if k not in state]
    if reinit:
        surgery.init_head(model, cfg.head_init)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        shapes = ", ".join(
            f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:4]
        )
        raise WeightsError(
            f"weights do not fit {cfg.name} ({shapes}); check model.name/model.kwargs match the weights"
        )
    result = model.load_state_dict(state, strict=False)
    surgery.check_load_keys(result.missing_keys, result.unexpected_keys, reinit)
    report.loaded = len(state)
    report.reinitialised = reinit


def create_backbone(
    cfg: ModelConfig, num_classes: int, source: WeightSource | None = None
) -> tuple[nn.Module, LoadReport]:
    """Build the recipe's model with a `num_classes` head and load its weights.

    `source` is `cfg.pretrained` already resolved by the caller (the teacher reads its
    config.json first); each weight file is resolved once and passed along.
    """
    extra = {"drop_rate": cfg.drop_rate, "drop_path_rate": cfg.drop_path_rate, **cfg.kwargs}
    report = LoadReport()
    if isinstance(cfg.pretrained, str):
        source = source or resolve_weight_file(cfg.pretrained)
    if source is not None and cfg.kwargs == {}:
        # An export remembers its architecture arguments: reuse them unless the recipe sets any.
        saved = source.config
        if saved is not None and saved.model_kwargs and saved.architecture == cfg.name:
            extra.update(saved.model_kwargs)
            report.notes.append(f"model.kwargs taken from {saved.path}: {saved.model_kwargs}")
    if cfg.pretrained is True:
        model = _hub_model(cfg, num_classes, extra)
        report.source = f"timm hub ({model.pretrained_cfg.get('hf_hub_id') or cfg.name})"
        report.grid_before = hub_grid(cfg.name, model.pretrained_cfg)
        if cfg.in_chans != 3:
            report.notes.append(
                f"input channels adapted 3 -> {cfg.in_chans} by timm (patch embedding)"
            )
    else:
        model = create_model(
            cfg.name, num_classes, cfg.img_size, cfg.patch_size, cfg.in_chans, **extra
        )
    if hasattr(model, "patch_embed"):
        _check_divisible(model, cfg.img_size)
    report.grid_after = surgery.grid_of(model)
    if source is not None:
        load_weights(model, source, cfg, report)
    elif cfg.pretrained is False:
        report.reinitialised = []
    return model, report


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes the tensors hold: about what a file of them needs (a full disk's message)."""
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
