"""sweep.space as Optuna suggestions and trial recipes (function level, no training)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from helpers import write_recipe

from vittune.errors import RecipeError
from vittune.recipe.load import load_recipe
from vittune.search.space import grid_of, recipe_start, suggest, sweep_config, trial_recipe

BASE = {"data": {"builtin": "digits"}, "model": {"img_size": 48, "patch_size": 8}}
SPACE = (
    "sweep.space={optim.lr: {loguniform: [1.0e-5, 1.0e-2]}, optim.layer_decay: {uniform: [0.5,"
    " 0.9]}, model.kwargs.depth: {int: [1, 3]}, model.img_size: {choice: [40, 48]}}"
)


def loaded(tmp_path: Path, *overrides: str):
    return load_recipe(write_recipe(tmp_path / "r.yaml", BASE), [SPACE, *overrides])


def test_suggestions_stay_inside_the_space(tmp_path: Path) -> None:
    recipe = loaded(tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        values = suggest(study.ask(), recipe.sweep.space)
        assert 1e-5 <= values["optim.lr"] <= 1e-2
        assert 0.5 <= values["optim.layer_decay"] <= 0.9
        assert values["model.kwargs.depth"] in (1, 2, 3)
        assert values["model.img_size"] in (40, 48)
    lr = study.trials[0].distributions["optim.lr"]
    assert lr.log and not study.trials[0].distributions["optim.layer_decay"].log


def test_a_trial_recipe_is_an_ordinary_run_in_the_sweep_folder(tmp_path: Path) -> None:
    recipe = loaded(tmp_path)
    values = {"optim.lr": 3e-4, "model.kwargs.depth": 2, "model.img_size": 40}
    trial = trial_recipe(recipe, "finetune", values, tmp_path / "s", "trial-007", "s")
    assert trial.optim.lr == 3e-4 and trial.model.kwargs == {"depth": 2}
    assert trial.model.img_size == (40, 40)
    assert trial.logging.run_dir == str(tmp_path / "s") and trial.logging.name == "trial-007"
    assert trial.logging.group == "s" and trial.sweep is None and trial.trainer.devices == 1
    # each value alone is accepted, the pair is not: that trial fails with the recipe's line
    refused = {"model.img_size": 40, "model.patch_size": 16}
    with pytest.raises(RecipeError, match="not divisible by model.patch_size 16"):
        trial_recipe(recipe, "finetune", refused, tmp_path / "s", "trial-008", "s")


def test_trial_zero_takes_the_recipes_values_that_lie_in_the_space(tmp_path: Path) -> None:
    recipe = loaded(tmp_path, "optim.lr=1e-3", "optim.layer_decay=0.95")
    # lr inside; layer_decay 0.95 outside [0.5, 0.9]; depth unset; img_size 48 stored as [48, 48]
    assert recipe_start(recipe, recipe.sweep.space) == {"optim.lr": 1e-3, "model.img_size": 48}


def test_sweep_only_rules(tmp_path: Path) -> None:
    # every way of asking for more than one device (the string forms were let through)
    for devices in ("2", "'2'", "-1", "'-1'", "'0,1'", "[0, 1]", "'1,3,'"):
        with pytest.raises(RecipeError, match="one device"):
            sweep_config(loaded(tmp_path, f"trainer.devices={devices}"))
    for devices in ("1", "'1'", "'1,'", "[3]", "auto"):  # one device: accepted
        assert sweep_config(loaded(tmp_path, f"trainer.devices={devices}")).space
    with pytest.raises(RecipeError, match="grid needs every sweep.space entry"):
        sweep_config(loaded(tmp_path, "sweep.sampler=grid"))
    with pytest.raises(RecipeError, match="no sweep.space"):
        sweep_config(load_recipe(write_recipe(tmp_path / "plain.yaml", BASE)))
    grid = load_recipe(
        tmp_path / "r.yaml",
        [
            "sweep.space={model.kwargs.depth: {int: [1, 3]}, augment.preset: {choice: [none, light]}}"
        ],
    )
    assert grid_of(grid.sweep.space) == {
        "model.kwargs.depth": [1, 2, 3],
        "augment.preset": ["none", "light"],
    }
