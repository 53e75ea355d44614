"""The first question every command on a finished run asks: is this a run folder at all?

Kept free of heavy imports (torch, Lightning, timm), so `vittune evaluate runs/typo` says what
is wrong at once instead of after seconds of imports.
"""

from __future__ import annotations

from pathlib import Path

from vittune.errors import RecipeError


def require_run_folder(folder: str | Path) -> Path:
    """`folder` as a Path when it holds a run's `recipe.yaml`; else one line saying what it is."""
    folder = Path(folder)
    if not folder.exists():
        raise RecipeError(
            f"{folder} does not exist; give the run folder a `vittune finetune` or"
            " `vittune distill` run printed (runs/<name>)"
        )
    if not (folder / "recipe.yaml").is_file():
        raise RecipeError(
            f"{folder} is not a vittune run folder (no recipe.yaml); give the folder a finished"
            " `vittune finetune` or `vittune distill` run printed"
        )
    return folder
