"""Warmup + cosine (and linear, constant) multipliers, stepped once per optimiser step."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
from conftest import TINY_VIT, make_class_images
from helpers import expected_lr, read_metrics, tiny, write_recipe

from vittune.optim.schedules import lr_multiplier
from vittune.recipe.load import load_recipe
from vittune.recipe.schema import Recipe
from vittune.tasks.assembly import build
from vittune.training.run import fit
from vittune.training.trainer import build_trainer


@pytest.mark.parametrize(
    ("total", "warmup", "min_ratio"), [(100, 10, 0.0), (37, 0, 0.1), (9, 2, 0.1)]
)
def test_cosine_with_warmup_matches_the_formula(total: int, warmup: int, min_ratio: float) -> None:
    factor = lr_multiplier("cosine", total, warmup, min_ratio)
    for step in range(total + 1):
        assert factor(step) == pytest.approx(expected_lr(step, total, warmup, 1.0, min_ratio))
    assert factor(warmup) == pytest.approx(1.0)  # the peak follows the warmup
    assert factor(total) == pytest.approx(min_ratio)


def test_warmup_rises_linearly_and_never_starts_at_zero() -> None:
    factor = lr_multiplier("cosine", 50, 4)
    rises = [factor(s) for s in range(5)]
    assert rises == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])


def test_linear_and_constant_schedules() -> None:
    linear = lr_multiplier("linear", 10, 0, 0.2)
    assert [linear(s) for s in (0, 5, 10)] == pytest.approx([1.0, 0.6, 0.2])
    constant = lr_multiplier("constant", 10, 3)
    assert [constant(s) for s in (0, 3, 9)] == pytest.approx([0.25, 1.0, 1.0])


def test_degenerate_lengths_do_not_divide_by_zero() -> None:
    assert lr_multiplier("cosine", 1, 5)(0) == pytest.approx(1.0)  # warmup clipped to the run
    assert lr_multiplier("cosine", 0, 0)(0) == pytest.approx(1.0)


class RecordLr(L.Callback):
    """The learning rate of every group at every optimiser step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def fit_recording_lrs(tmp_path: Path, schedule: dict, trainer: dict) -> list[list[float]]:
    """Fit a tiny ViT on 2 classes x 13 images (3 held out per class -> 20 train images, 5
    batches of 4 per epoch) and return every group's lr at every optimiser step."""
    make_class_images(tmp_path / "data", {"a": 13, "b": 13}, size=32)
    recipe = Recipe.model_validate(
        {
            "model": {**TINY_VIT, "drop_path_rate": 0.0},
            "data": {
                "root": str(tmp_path / "data"),
                "val_fraction": 0.2,
                "batch_size": 4,
                "num_workers": 0,
            },
            "augment": {"preset": "none"},
            "optim": {"lr": 0.01, "weight_decay": 0.05},
            "schedule": schedule,
            "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", **trainer},
            "logging": {"wandb": False},
        }
    )
    assembly = build(recipe, "finetune")
    recorder = RecordLr()
    fitted, _, _ = build_trainer(recipe, tmp_path / "run", ("val/acc1", "max"), [recorder])
    fitted.fit(assembly.task, datamodule=assembly.datamodule)
    assert fitted.global_step == len(recorder.lrs)
    return recorder.lrs


def test_schedule_steps_per_optimiser_step_with_accumulation(tmp_path: Path) -> None:
    # Accumulating 2 batches gives ceil(5 / 2) = 3 optimiser steps per epoch, 9 in 3 epochs.
    lrs = fit_recording_lrs(
        tmp_path,
        {"name": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.1},
        {"max_epochs": 3, "accumulate_grad_batches": 2},
    )
    total = 3 * math.ceil(5 / 2)
    assert len(lrs) == total
    for step, group_lrs in enumerate(lrs):
        assert group_lrs == pytest.approx([expected_lr(step, total, 2, 0.01, 0.1)] * len(group_lrs))


def test_warmup_epochs_stay_real_epochs_when_max_steps_caps_training(tmp_path: Path) -> None:
    # 5 optimiser steps per epoch, so one warmup epoch is 5 steps, also when max_steps=7 ends
    # training long before max_epochs=10.
    lrs = fit_recording_lrs(
        tmp_path, {"name": "cosine", "warmup_epochs": 1}, {"max_epochs": 10, "max_steps": 7}
    )
    assert len(lrs) == 7
    for step, group_lrs in enumerate(lrs):
        assert group_lrs[0] == pytest.approx(expected_lr(step, 7, 5, 0.01))


def test_a_finished_run_resumed_with_more_epochs_continues_on_the_stretched_schedule(
    tmp_path: Path,
) -> None:
    """`trainer.max_epochs` may grow on resume: every resumed step, the first included, takes
    the new schedule's lr (the optimiser was saved with the old schedule's final lr, 0)."""
    make_class_images(tmp_path / "data", {"a": 12, "b": 12}, size=32)
    recipe_path = write_recipe(
        tmp_path / "r.yaml", {"data": {"root": str(tmp_path / "data"), "val_fraction": 0.25}}
    )
    lr = 1e-3

    def train(*overrides: str) -> Path:
        base = tiny("data.batch_size=4", "trainer.log_every_n_steps=1", f"optim.lr={lr}")
        recipe = load_recipe(
            recipe_path,
            [*base, f"logging.run_dir={tmp_path / 'runs'}", "logging.name=run", *overrides],
            command="finetune",
        )
        return fit(recipe, "finetune", tmp_path, log=lambda _: None).run_dir

    train("trainer.max_epochs=2")
    run_dir = train("trainer.max_epochs=4", "trainer.resume_from=auto")
    logged = {int(r["step"]): float(r["lr/decay"]) for r in read_metrics(run_dir) if r["lr/decay"]}
    steps_per_epoch = 18 // 4  # 18 training images, the partial batch dropped
    total = 4 * steps_per_epoch
    resumed = range(2 * steps_per_epoch, total)
    assert logged[2 * steps_per_epoch - 1] < lr * 0.05  # the first run did end its cosine
    for step in resumed:
        assert logged[step] == pytest.approx(expected_lr(step, total, 0, lr, 0.0)), step
