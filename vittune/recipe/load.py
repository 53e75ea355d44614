"""Recipe loading: command defaults, then the YAML file (with `base:` inheritance),
then dotted command-line overrides, merged in that order and validated by the schema.

Recipes are data: files go through PyYAML's SafeLoader and nothing in them is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from vittune.errors import RecipeError
from vittune.recipe.checks import check_recipe
from vittune.recipe.overrides import (
    deep_merge,
    format_validation_error,
    parse_override,
    safe_load,
)
from vittune.recipe.schema import Command, Recipe

# Paper defaults that differ from fine-tuning (He et al. 2021, Table 8); the recipe
# file and the command line override them.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "finetune": {},
    "pretrain-mae": {
        "mae": {},
        "optim": {"lr": 1.5e-4, "lr_scaling": "linear", "betas": [0.9, 0.95], "weight_decay": 0.05},
        "augment": {"preset": "light"},
        "model": {"drop_path_rate": 0.0},
    },
    "distill": {},
}


def read_recipe_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read one YAML recipe, resolving `base:` (relative to the file) recursively."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(
            f"recipe file not found: {path} (check the path; recipes live in recipes/)"
        )
    resolved = path.resolve()
    if resolved in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, resolved))
        raise RecipeError(f"recipe `base:` chain loops back on itself: {chain}; remove one `base:`")
    try:
        content = safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RecipeError(
            f"recipe {path} is not valid YAML{where}: {getattr(err, 'problem', err)}"
        ) from None
    if not isinstance(content, dict):
        raise RecipeError(
            f"recipe {path} must be a mapping of sections (model:, data:, ...), got {type(content).__name__}"
        )
    base = content.pop("base", None)
    if base is None:
        return content
    if not isinstance(base, str):
        raise RecipeError(f"`base:` in {path} must be a path to another recipe, got {base!r}")
    parent = read_recipe_file(path.parent / base, (*_seen, resolved))
    return deep_merge(parent, content)


def load_recipe(
    path: str | Path, overrides: list[str] | None = None, command: Command | None = "finetune"
) -> Recipe:
    """Resolve a recipe file plus overrides into a validated Recipe.

    `command=None` takes the command from the recipe's own `task:` (else finetune), for
    commands such as `inspect` that serve every task.
    """
    raw = read_recipe_file(path)
    for text in overrides or []:
        raw = deep_merge(raw, parse_override(text))
    if command is None:
        command = raw.get("task") if raw.get("task") in COMMAND_DEFAULTS else "finetune"
    return validated(deep_merge(COMMAND_DEFAULTS[command], raw), command)


def validated(raw: dict[str, Any], command: Command) -> Recipe:
    """`raw` as a Recipe that the schema and `command`'s checks accept; each refusal one line."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(format_validation_error(err)) from None
    check_recipe(recipe, command)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    """The fully resolved recipe as YAML, loadable again with `load_recipe`."""
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
