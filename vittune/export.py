"""Exported weights: `model.safetensors` in timm key names plus a `config.json`.

`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...,
num_classes=N), num_classes=N, **geometry)` loads the export directly. `num_classes` must
be in the overlay too: timm discards a checkpoint's head whenever the model's class count
differs from the pretrained config's (1000 for ImageNet tags). vittune reads `config.json`
to know the classes and the token grid the weights were trained at.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from vittune.models.weights import read_state_dict
from vittune.recipe.schema import Command, Recipe
from vittune.run_folder import atomic_write

if TYPE_CHECKING:  # the assembly imports every task; an export needs none of them
    from vittune.assembly import Assembly


def export_config(
    model_name: str,
    model: nn.Module,
    classes: list[str],
    img_size: int | tuple[int, int],
    in_chans: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    model_kwargs: dict[str, Any],
    task: str,
) -> dict[str, Any]:
    size = [img_size, img_size] if isinstance(img_size, int) else list(img_size)
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    return {
        "architecture": model_name,
        "task": task,
        "classes": list(classes),
        "num_classes": len(classes),
        "img_size": size,
        "patch_size": int(patch[0]) if patch is not None else None,
        "in_chans": in_chans,
        "mean": list(mean),
        "std": list(std),
        "model_kwargs": model_kwargs,
    }


def contiguous_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared or strided storage; give it plain CPU copies."""
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}


def write_export(
    state: dict[str, torch.Tensor],
    config: dict[str, Any],
    folder: Path,
    filename: str = "model.safetensors",
) -> Path:
    """Write the weights and config.json, each atomically and readable by all (0644): an
    export is meant to be shared, and a kill mid-write must not leave a truncated file."""
    path = folder / filename
    tensors = contiguous_state(state)
    metadata = {"format": "pt", "architecture": config["architecture"]}
    atomic_write(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
    text = json.dumps(config, indent=2) + "\n"
    atomic_write(folder / "config.json", lambda temp: temp.write_text(text))
    return path


def export_best(
    assembly: Assembly, recipe: Recipe, command: Command, best_checkpoint: str | None, run_dir: Path
) -> Path:
    """Write the best (else last) weights of the exported module in timm key names."""
    module = assembly.export_module(assembly.task)
    candidates = [best_checkpoint, str(run_dir / "checkpoints" / "last.ckpt")]
    best = next((p for p in candidates if p and Path(p).is_file()), None)
    state = read_state_dict(Path(best)) if best else module.state_dict()
    own = set(module.state_dict())
    state = {k: v for k, v in state.items() if k in own}
    config = export_config(
        recipe.model.name,
        module,
        assembly.classes,
        recipe.model.img_size,
        recipe.model.in_chans,
        assembly.mean,
        assembly.std,
        dict(recipe.model.kwargs),
        command,
    )
    return write_export(state, config, run_dir, assembly.export_name)
