"""The one assembly path: recipe + command -> everything a run needs besides the Trainer.

Training, `inspect`, and every command that loads a model (evaluate, predict, export,
attention) build through `build()`. It is free of side effects: it creates no folder, starts
no logger and touches no network beyond the weight sources the recipe names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from vittune.data.datamodule import ImageDataModule, scan_sources
from vittune.data.datasets import SplitSamples
from vittune.errors import DataError, RecipeError
from vittune.models.adapters import apply_peft
from vittune.models.backbone import LoadReport, create_backbone
from vittune.models.freezing import apply_freeze, frozen_blocks_at
from vittune.models.normalisation import resolve_normalisation
from vittune.recipe.schema import Command, Recipe
from vittune.tasks.base import VitTask
from vittune.tasks.callbacks import AttentionMaps, GradualUnfreeze
from vittune.tasks.classification import ClassificationTask
from vittune.tasks.ema import EmaUpdate
from vittune.tasks.losses import balanced_class_weights


@dataclass
class Assembly:
    """Everything a run needs besides the Trainer."""

    task: VitTask
    datamodule: ImageDataModule
    report: LoadReport
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    export_name: str = "model.safetensors"
    export_module: Callable[[VitTask], nn.Module] = lambda task: task.model
    callbacks: list[Callback] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Training batches may arrive as integers; the task normalises them on the device
        # with the data module's own normaliser (the values it normalises everything else with).
        self.task.input_normalise = self.datamodule.normalise


def class_weights(recipe: Recipe, datamodule: ImageDataModule) -> torch.Tensor | None:
    setting = recipe.loss.class_weights
    if setting == "none":
        return None
    if setting == "balanced":
        return balanced_class_weights(datamodule.class_counts())
    if len(setting) != len(datamodule.classes):
        raise RecipeError(
            f"loss.class_weights has {len(setting)} values but the data has {len(datamodule.classes)} classes {datamodule.classes}"
        )
    return torch.tensor(setting, dtype=torch.float)


def freeze_for_recipe(model: nn.Module, recipe: Recipe) -> list[Callback]:
    """Freeze what the recipe says at epoch 0; a schedule adds the callback that unfreezes later."""
    cfg = recipe.freeze
    probe = cfg.linear_probe and 0 not in cfg.unfreeze_schedule
    try:
        apply_freeze(model, frozen_blocks_at(0, cfg.frozen_blocks, cfg.unfreeze_schedule), probe)
    except ValueError as err:
        raise RecipeError(
            f"freeze: {err}; use freeze.linear_probe to train only the head"
        ) from None
    if not any(p.requires_grad for p in model.parameters()):
        raise RecipeError("freeze settings leave no parameter to train; lower freeze.frozen_blocks")
    return [GradualUnfreeze(cfg, recipe.optim)] if cfg.unfreeze_schedule else []


def adapt_for_recipe(model: nn.Module, recipe: Recipe) -> list[Callback]:
    """`peft:` adapters (which also freeze the backbone) or the `freeze:` settings; and the
    EMA's update callback when the recipe has an `ema:` section."""
    ema = [EmaUpdate(recipe.ema)] if recipe.ema is not None else []
    if recipe.peft.method == "none":
        return freeze_for_recipe(model, recipe) + ema
    apply_peft(model, recipe.peft)
    return ema


def attention_callbacks(
    recipe: Recipe, run_dir: Path | None, mean: tuple[float, ...], std: tuple[float, ...]
) -> list[Callback]:
    """`logging.attention_every_n_epochs`: attention maps of fixed validation images."""
    every = recipe.logging.attention_every_n_epochs
    if every is None or run_dir is None:
        return []
    return [AttentionMaps(run_dir, every, mean, std)]


def _datamodule(
    recipe: Recipe,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    found: SplitSamples,
    run_dir: Path | None,
) -> ImageDataModule:
    cfg = recipe.data
    size, chans = recipe.model.img_size, recipe.model.in_chans
    return ImageDataModule(cfg, recipe.augment, size, mean, std, chans, found, run_dir)


def _labelled_classes(found: SplitSamples) -> list[str]:
    if len(found.classes) < 2:
        raise DataError(
            f"classification needs at least 2 classes, found {found.classes}; check data.root / data.csv"
        )
    return found.classes


def build_finetune(recipe: Recipe, found: SplitSamples, run_dir: Path | None) -> Assembly:
    classes = _labelled_classes(found)
    model, report = create_backbone(recipe.model, num_classes=len(classes))
    mean, std = resolve_normalisation(
        model, recipe.data.mean, recipe.data.std, recipe.model.in_chans
    )
    datamodule = _datamodule(recipe, mean, std, found, run_dir)
    callbacks = adapt_for_recipe(model, recipe) + attention_callbacks(recipe, run_dir, mean, std)
    task = ClassificationTask(recipe, model, classes, class_weights(recipe, datamodule), run_dir)
    return Assembly(task, datamodule, report, classes, mean, std, callbacks=callbacks)


def build_pretrain_mae(recipe: Recipe, found: SplitSamples, run_dir: Path | None) -> Assembly:
    from vittune.tasks.mae import MaeTask  # noqa: PLC0415 (only MAE runs pay for its import)

    encoder, report = create_backbone(recipe.model, num_classes=0)
    mean, std = resolve_normalisation(
        encoder, recipe.data.mean, recipe.data.std, recipe.model.in_chans
    )
    datamodule = _datamodule(recipe, mean, std, found, run_dir)
    task = MaeTask(recipe, encoder, run_dir=run_dir, mean=mean, std=std)
    return Assembly(
        task, datamodule, report, found.classes, mean, std, export_name="encoder.safetensors"
    )


def build_distill(recipe: Recipe, found: SplitSamples, run_dir: Path | None) -> Assembly:
    from vittune.models.teacher import build_teacher  # noqa: PLC0415
    from vittune.tasks.distillation import DistillationTask  # noqa: PLC0415

    classes = _labelled_classes(found)
    student, report = create_backbone(recipe.model, num_classes=len(classes))
    mean, std = resolve_normalisation(
        student, recipe.data.mean, recipe.data.std, recipe.model.in_chans
    )
    teacher = build_teacher(recipe.distill.teacher, classes, recipe.model.in_chans, mean, std)
    datamodule = _datamodule(recipe, mean, std, found, run_dir)
    callbacks = adapt_for_recipe(student, recipe) + attention_callbacks(recipe, run_dir, mean, std)
    task = DistillationTask(recipe, student, teacher, classes, run_dir)
    return Assembly(task, datamodule, report, classes, mean, std, callbacks=callbacks)


BUILDERS: dict[str, Callable[[Recipe, SplitSamples, Path | None], Assembly]] = {
    "finetune": build_finetune,
    "pretrain-mae": build_pretrain_mae,
    "distill": build_distill,
}


def build(
    recipe: Recipe,
    command: Command,
    run_dir: Path | None = None,
    found: SplitSamples | None = None,
) -> Assembly:
    """Assemble the task, data module and callbacks of `command` for a checked recipe.

    `run_dir` is where the task saves its figures (None: nowhere). `found` replaces the scan
    of the recipe's data (inspect uses a stand-in when the data is not on this machine).
    """
    return BUILDERS[command](recipe, found or scan_sources(recipe.data), run_dir)
