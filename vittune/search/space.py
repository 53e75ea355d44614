"""A sweep's search space: `sweep.space` entries as Optuna suggestions, and a trial's recipe.

The space itself is checked when the recipe loads (recipe/checks.py `check_sweep_space`: every
key is a recipe key, every end of every range a value the schema accepts). Here it becomes
Optuna calls, and a trial's values become a full recipe that the ordinary run path trains.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from vittune.errors import RecipeError
from vittune.recipe.load import validated
from vittune.recipe.overrides import set_dotted
from vittune.recipe.schema import Command, Recipe, SpaceEntry, SweepConfig
from vittune.recipe.trainer_settings import requested_devices

if TYPE_CHECKING:
    import optuna


def sweep_config(recipe: Recipe) -> SweepConfig:
    """The recipe's `sweep:` section, refused in one line when there is nothing to search or a
    trial could not run on one device."""
    cfg = recipe.sweep
    if cfg is None or not cfg.space:
        raise RecipeError(
            "the recipe has no sweep.space to search; add e.g."
            " 'sweep.space={optim.lr: {loguniform: [1.0e-4, 3.0e-3]}}' (docs/sweeps.md)"
        )
    # auto becomes one device per trial (trial_recipe); -1 (all) or several are refused
    if requested_devices(recipe.trainer.devices) not in (None, 1) or recipe.trainer.num_nodes > 1:
        raise RecipeError(
            "a sweep trains each trial on one device; set trainer.devices=1 and start one"
            " `vittune sweep --study NAME` worker per GPU (docs/sweeps.md)"
        )
    if cfg.sampler == "grid":
        continuous = [k for k, e in cfg.space.items() if e.kind in ("uniform", "loguniform")]
        if continuous:
            raise RecipeError(
                f"sweep.sampler: grid needs every sweep.space entry to be int or choice, but"
                f" {', '.join(continuous)} is continuous; list its values with choice: [...]"
            )
    return cfg


def grid_of(space: dict[str, SpaceEntry]) -> dict[str, list[Any]]:
    """Every value of every (int or choice) entry, for Optuna's GridSampler."""
    return {
        key: list(range(e.int[0], e.int[1] + 1)) if e.kind == "int" else list(e.choice)
        for key, e in space.items()
    }


def suggest(trial: optuna.Trial, space: dict[str, SpaceEntry]) -> dict[str, Any]:
    """The trial's value of every space key (Optuna names the parameters by the dotted key)."""
    values: dict[str, Any] = {}
    for key, entry in space.items():
        if entry.kind == "choice":
            values[key] = trial.suggest_categorical(key, entry.choice)
        elif entry.kind == "int":
            values[key] = trial.suggest_int(key, *entry.int)
        else:
            low, high = getattr(entry, entry.kind)
            values[key] = trial.suggest_float(key, low, high, log=entry.kind == "loguniform")
    return values


def value_at(raw: dict[str, Any], key: str) -> Any:
    """The value of a dotted key in a dumped recipe (None where the path is absent)."""
    cursor: Any = raw
    for part in key.split("."):
        if not isinstance(cursor, dict) or part not in cursor:
            return None
        cursor = cursor[part]
    return cursor


def shown_value(value: Any) -> str:
    """A trial's value as the console and the sweep report show it (floats to 4 digits)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def recipe_start(recipe: Recipe, space: dict[str, SpaceEntry]) -> dict[str, Any]:
    """The recipe's own values of the space keys that lie inside the space (trial 0). A choice
    matches as the schema stores it (`img_size` 48 is the recipe's [48, 48])."""
    raw = recipe.model_dump(mode="json")
    start: dict[str, Any] = {}
    for key, entry in space.items():
        value = value_at(raw, key)
        if entry.kind == "choice":
            matches = [c for c in entry.choice if _as_stored(raw, key, c) == value]
            if matches:
                start[key] = matches[0]
            continue
        if entry.kind == "int":
            inside = isinstance(value, int) and entry.int[0] <= value <= entry.int[1]
        else:
            low, high = getattr(entry, entry.kind)
            inside = (
                isinstance(value, int | float) and math.isfinite(value) and low <= value <= high
            )
        if inside:
            start[key] = value
    return start


def _as_stored(raw: dict[str, Any], key: str, value: Any) -> Any:
    """`value` at `key` as the validated recipe stores it (None when the schema refuses it)."""
    probe = copy.deepcopy(raw)
    set_dotted(probe, key, value)
    try:
        return value_at(Recipe.model_validate(probe).model_dump(mode="json"), key)
    except ValidationError:
        return None


def trial_recipe(
    recipe: Recipe,
    command: Command,
    values: dict[str, Any],
    sweep_dir: Path,
    trial_name: str,
    group: str,
) -> Recipe:
    """The base recipe with the trial's values, trained as `<sweep_dir>/<trial_name>/`.

    A combination the recipe refuses (checked as any recipe is) is a RecipeError: the trial
    fails with that line and the sweep goes on.
    """
    raw = recipe.model_dump(mode="json")
    for key, value in values.items():
        set_dotted(raw, key, value)
    raw["sweep"] = None  # a trial is an ordinary run
    raw["logging"].update(run_dir=str(sweep_dir), name=trial_name, group=group)
    raw["trainer"]["resume_from"] = None
    if raw["trainer"]["devices"] == "auto":
        raw["trainer"]["devices"] = 1  # one trial per device; more devices = more workers
    return validated(raw, command)
