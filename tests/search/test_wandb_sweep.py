"""`--wandb-sweep`: the same space as a W&B sweep whose agent runs vittune's dotted overrides."""

from __future__ import annotations

from pathlib import Path

import yaml
from helpers import write_recipe

from vittune.recipe.load import load_recipe
from vittune.search.wandb_sweep import write_wandb_sweep

SPACE = {
    "optim.lr": {"loguniform": [1.0e-4, 3.0e-3]},
    "optim.layer_decay": {"uniform": [0.5, 0.9]},
    "model.kwargs.depth": {"int": [2, 4]},
    "augment.preset": {"choice": ["light", "strong"]},
}


def test_the_wandb_sweep_file_matches_the_space_and_its_command_loads(tmp_path: Path) -> None:
    recipe_path = write_recipe(
        tmp_path / "r.yaml",
        {
            "data": {"builtin": "digits"},
            "model": {"img_size": 32, "patch_size": 8},
            "logging": {"name": "exp", "project": "p"},
            "sweep": {"space": SPACE, "pruner": "hyperband", "trials": 12},
        },
    )
    overrides = ["trainer.max_epochs=5", "sweep.trials=12"]
    recipe = load_recipe(recipe_path, overrides)
    out = tmp_path / "wandb-sweep.yaml"
    write_wandb_sweep(recipe, "finetune", str(recipe_path), overrides, out, log=lambda _: None)
    config = yaml.safe_load(out.read_text())
    assert config["method"] == "bayes" and config["run_cap"] == 12 and config["project"] == "p"
    assert config["metric"] == {"name": "val/acc1", "goal": "maximize"}
    assert config["early_terminate"] == {"type": "hyperband", "min_iter": 1}
    assert config["parameters"] == {
        "optim.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 3e-3},
        "optim.layer_decay": {"distribution": "uniform", "min": 0.5, "max": 0.9},
        "model.kwargs.depth": {"distribution": "int_uniform", "min": 2, "max": 4},
        "augment.preset": {"values": ["light", "strong"]},
    }
    command = config["command"]
    assert command[:4] == ["${env}", "vittune", "finetune", str(recipe_path)]
    assert command[-1] == "${args_no_hyphens}" and "sweep.trials=12" not in command
    # what the agent runs: the command's overrides, then W&B's key=value for a sampled point
    sampled = ["optim.lr=0.00031", "optim.layer_decay=0.7", "model.kwargs.depth=3"]
    run = load_recipe(recipe_path, [*command[4:-1], *sampled, "augment.preset=strong"])
    assert run.optim.lr == 0.00031 and run.optim.layer_decay == 0.7
    assert run.model.kwargs == {"depth": 3} and run.augment.preset == "strong"
    assert run.trainer.max_epochs == 5 and run.logging.wandb and run.logging.name is None
