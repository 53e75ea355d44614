"""Building a finished PEFT / EMA run's model again, for evaluate, predict, attention, export.

Its `model.safetensors` holds merged, plain timm weights (EMA already chosen), so it is loaded
into the plain backbone: no adapters, no EMA, and for shallow VPT the prompts as timm register
tokens. Weights that keep their adapters (a checkpoint, or VPT-deep's export) need the adapters
built first and are loaded after the build (`load_after_build`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vittune.recipe.schema import PeftConfig, Recipe


def recipe_for_weights(
    recipe: Recipe, weights: Path, config: dict[str, Any]
) -> tuple[Recipe, bool]:
    """(the recipe that builds a model these weights fit, whether to load them after the build).

    `config` is the run's config.json (timm layout with vittune's facts under `vittune`).
    """
    recipe = recipe.model_copy(update={"ema": None})  # the weights are already the average
    method = recipe.peft.method
    if method == "none":
        return recipe, False
    merged = bool((config.get("vittune") or {}).get("peft", {}).get("merged"))
    if weights.suffix == ".safetensors" and merged:
        kwargs = dict(recipe.model.kwargs)
        if method == "vpt":  # the prompts became register tokens (adapters/vpt.py)
            kwargs["reg_tokens"] = (config.get("model_args") or {}).get("reg_tokens", 0)
        model = recipe.model.model_copy(update={"kwargs": kwargs})
        return recipe.model_copy(update={"peft": PeftConfig(), "model": model}), False
    model = recipe.model.model_copy(update={"pretrained": False})
    return recipe.model_copy(update={"model": model}), True
