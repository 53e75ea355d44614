"""Recipe settings that must work together: early stopping under a `max_steps` cap."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY_VIT, make_class_images

from vittune.recipe.schema import Recipe
from vittune.tasks.assembly import build
from vittune.training.trainer import build_trainer


def test_early_stopping_with_max_steps_ending_mid_epoch(tmp_path: Path) -> None:
    # A smoke run of a recipe with early stopping: 2 steps of a 5-step epoch end training
    # before any validation, so the monitored metric never exists; that must not crash.
    make_class_images(tmp_path / "data", {"a": 13, "b": 13}, size=32)
    recipe = Recipe.model_validate(
        {
            "model": TINY_VIT,
            "data": {"root": str(tmp_path / "data"), "batch_size": 4, "num_workers": 0},
            "trainer": {
                "max_steps": 2,
                "early_stopping_patience": 1,
                "accelerator": "cpu",
                "devices": 1,
                "precision": "32-true",
            },
            "checkpoint": {"monitor": "val/auroc", "mode": "max"},
            "logging": {"wandb": False},
        }
    )
    assembly = build(recipe, "finetune")
    trainer, _, _ = build_trainer(recipe, tmp_path / "run", ("val/auroc", "max"), [])
    trainer.fit(assembly.task, datamodule=assembly.datamodule)
    assert trainer.global_step == 2


def test_early_stopping_still_stops_on_the_validation_metric(tmp_path: Path) -> None:
    # lr 1e-12 freezes the model, so val/acc1 never improves: patience 1 stops after epoch 2.
    # (Not val/loss: a change in its last bits, from the summation order of a loaded
    # machine's threads, counted as an improvement and let a third epoch run.)
    make_class_images(tmp_path / "data", {"a": 6, "b": 6}, size=32)
    recipe = Recipe.model_validate(
        {
            "model": {**TINY_VIT, "drop_path_rate": 0.0},
            "data": {"root": str(tmp_path / "data"), "batch_size": 4, "num_workers": 0},
            "augment": {"preset": "none"},
            "optim": {"lr": 1e-12},
            "trainer": {
                "max_epochs": 10,
                "early_stopping_patience": 1,
                "accelerator": "cpu",
                "devices": 1,
                "precision": "32-true",
            },
            "logging": {"wandb": False},
        }
    )
    assembly = build(recipe, "finetune")
    trainer, _, _ = build_trainer(recipe, tmp_path / "run", ("val/acc1", "max"), [])
    trainer.fit(assembly.task, datamodule=assembly.datamodule)
    assert trainer.current_epoch == 2  # epochs 0 and 1 ran; epoch 1 did not improve
