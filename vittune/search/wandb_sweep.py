"""`vittune sweep --wandb-sweep FILE`: the same search as a W&B sweep configuration.

For users who prefer W&B's sweep server: `wandb sweep FILE` registers it and `wandb agent ID`
runs `vittune <command> RECIPE [overrides] key=value ...`, where `${args_no_hyphens}` expands
to the sampled values as vittune's own dotted overrides (`optim.lr=0.0003`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from vittune.recipe.schema import Command, Recipe, SpaceEntry
from vittune.search.space import sweep_config
from vittune.search.sweep import default_sweep_name, monitor_for
from vittune.training.run_folder import atomic_write

METHODS = {"tpe": "bayes", "random": "random", "grid": "grid"}


def wandb_parameter(entry: SpaceEntry) -> dict[str, Any]:
    """One `sweep.space` entry in W&B's parameter syntax."""
    if entry.kind == "choice":
        return {"values": list(entry.choice)}
    low, high = getattr(entry, entry.kind)
    distribution = {"loguniform": "log_uniform_values", "uniform": "uniform", "int": "int_uniform"}
    return {"distribution": distribution[entry.kind], "min": low, "max": high}


def wandb_sweep_config(
    recipe: Recipe, command: Command, recipe_path: str, overrides: list[str]
) -> dict[str, Any]:
    cfg = sweep_config(recipe)
    monitor, mode = monitor_for(recipe, command)
    config: dict[str, Any] = {
        "program": "vittune",
        "name": default_sweep_name(recipe, recipe_path),
        "project": recipe.logging.project,
        "method": METHODS[cfg.sampler],
        "metric": {"name": monitor, "goal": "maximize" if mode == "max" else "minimize"},
        "parameters": {key: wandb_parameter(entry) for key, entry in cfg.space.items()},
        "run_cap": cfg.trials,
        # each agent run logs to W&B (the agent reads the metric from there) in its own folder
        "command": [
            "${env}",
            "vittune",
            command,
            recipe_path,
            *(o for o in overrides if not o.startswith("sweep.")),  # the agent runs plain runs
            "logging.wandb=true",
            "logging.name=null",
            "${args_no_hyphens}",
        ],
    }
    if recipe.logging.entity:
        config["entity"] = recipe.logging.entity
    if cfg.pruner == "hyperband":  # W&B stops runs early only by hyperband
        config["early_terminate"] = {
            "type": "hyperband",
            "min_iter": max(1, cfg.prune_after_epochs),
        }
    return config


def write_wandb_sweep(
    recipe: Recipe,
    command: Command,
    recipe_path: str,
    overrides: list[str],
    out: str | Path,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    config = wandb_sweep_config(recipe, command, recipe_path, overrides)
    text = yaml.safe_dump(config, sort_keys=False)
    atomic_write(Path(out), lambda temp: temp.write_text(text))
    log(f"vittune sweep: wrote the W&B sweep {out}; start it with: wandb sweep {out}")
    log("  then on each machine: wandb agent <the sweep id wandb prints>")
    if recipe.sweep.pruner == "median":
        log("  (W&B stops runs early only by hyperband: sweep.pruner median is not carried over)")
    return config
