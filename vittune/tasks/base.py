"""The template every vittune LightningModule follows (after torchgeo's `BaseTask`):
`__init__` stores the recipe, then runs `configure_models`, `configure_losses` and
`configure_metrics`, which each task fills in; optimisation and the schedule are shared here
so that every task gets layer decay and warmup alike.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from vittune.data.transforms import IntegerNormalise
from vittune.models.compiling import allow_recompiles, compile_in_place, uncompile
from vittune.optim.param_groups import build_optimizer, build_param_groups
from vittune.optim.schedules import lr_multiplier
from vittune.recipe.schema import Recipe


def effective_lr(recipe: Recipe, world_size: int) -> float:
    """`optim.lr`, scaled by effective batch / 256 when `optim.lr_scaling: linear` (MAE, DeiT)."""
    if recipe.optim.lr_scaling == "none":
        return recipe.optim.lr
    batch = recipe.data.batch_size * recipe.trainer.accumulate_grad_batches * world_size
    return recipe.optim.lr * batch / 256


def optimizer_steps_per_epoch(trainer: L.Trainer, total_steps: int) -> int:
    """Optimiser steps in one real epoch, also when `max_steps` ends training early.

    `estimated_stepping_batches` (already called, so the train loader is set up) is capped by
    `max_steps`; dividing it by `max_epochs` would shrink "warmup_epochs" with the cap.
    """
    batches = trainer.num_training_batches
    if math.isinf(batches):  # an iterable dataset of unknown length: spread what is known
        return max(1, total_steps // max(1, trainer.max_epochs or 1))
    return max(1, math.ceil(batches / trainer.accumulate_grad_batches))


class VitTask(L.LightningModule):
    """Shared template and optimiser/schedule wiring; subclasses define models and steps."""

    #: metric the checkpoint callback watches unless the recipe names one
    default_monitor: tuple[str, str] = ("val/loss", "min")

    def __init__(self, recipe: Recipe, run_dir: str | Path | None = None, **parts: Any) -> None:
        """`parts` are the built pieces (backbone, teacher, classes...) for `configure_models`.

        The assembly builds the backbone (weights, surgery, freezing) before the task exists,
        so the task receives it rather than creating it from the hyperparameters.
        """
        super().__init__()
        self.recipe = recipe
        # Normalises integer training batches on the device (the assembly sets it, with the
        # data module's mean and std); a plain attribute, so checkpoints do not hold it.
        self.input_normalise: IntegerNormalise | None = None
        self.run_dir = Path(run_dir) if run_dir else None
        self.save_hyperparameters({"recipe": recipe.model_dump(mode="json")})
        self.configure_models(**parts)
        self.configure_losses()
        self.configure_metrics()

    def configure_models(self, **parts: Any) -> None:
        """Keep the modules this task trains or consults (the backbone as `self.model`)."""
        raise NotImplementedError

    def configure_losses(self) -> None:
        """Create the loss modules (none by default: MAE's loss is part of its model)."""

    def configure_metrics(self) -> None:
        """Create the torchmetrics objects (none by default)."""

    def optimised_module(self) -> nn.Module:
        """The module whose parameters are grouped (the backbone; MAE adds its decoder)."""
        return self.model

    def compiled_modules(self) -> list[nn.Module]:
        """What `trainer.compile` compiles in place (the backbone; MAE and distillation differ)."""
        return [self.model]

    def log_train_loss(
        self, name: str, loss: Tensor, batch_size: int, on_step: bool = True
    ) -> None:
        """Log a training loss (per step, and always as the epoch's mean) over every process's
        images: without `sync_dist` a DDP run's `train/loss_epoch` was rank 0's shard alone.
        The step value is then the mean over the processes' batches, one scalar all-reduce."""
        self.log(
            name, loss, prog_bar=on_step, on_step=on_step, on_epoch=True,
            batch_size=batch_size, sync_dist=True,
        )  # fmt: skip

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Normalise integer images (training batches of presets without float steps, see
        `IntegerFirst.integers`) where they now are; float batches pass through unchanged.
        Runs before `training_step`, so mixup/cutmix see normalised floats."""
        images = batch[0] if isinstance(batch, list | tuple) and batch else batch
        if not isinstance(images, Tensor) or images.is_floating_point():
            return batch
        if self.input_normalise is None:
            raise RuntimeError(
                "an integer image batch reached the task but nothing normalises it; set "
                "task.input_normalise = IntegerNormalise(mean, std) (vittune.tasks.assembly does)"
            )
        images = self.input_normalise(images)
        if isinstance(batch, Tensor):
            return images
        return type(batch)([images, *batch[1:]])

    def on_fit_start(self) -> None:
        """`trainer.compile`: compile for training only, in place (no `_orig_mod.` key prefix).

        Here rather than in the assembly, so that evaluate, predict, export and the attention
        command, which build the same task but run each image once, never pay a compilation.
        Compilation itself happens at the first call (docs/compile.md).
        """
        if not self.recipe.trainer.compile:
            return
        # A training and a validation graph, each once more for a ragged last batch, and both
        # again at every unfreeze (dynamo guards on requires_grad).
        allow_recompiles(4 + 2 * len(self.recipe.freeze.unfreeze_schedule))
        for module in self.compiled_modules():
            compile_in_place(module)

    def on_train_start(self) -> None:
        """Set each group's lr from the schedule where the run stands. A resume restores the
        optimiser's lr as saved, which the first step would use: 0 at the end of a finished
        cosine run that `trainer.max_epochs` now stretches (the schedule itself is rebuilt
        for the new length); for any other resume this writes the value already there."""
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, LambdaLR):
                groups = scheduler.optimizer.param_groups
                for group, base, factor in zip(
                    groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True
                ):
                    group["lr"] = base * factor(scheduler.last_epoch)

    def on_fit_end(self) -> None:
        # The test split after fit and the export run eagerly: one pass is not worth a compile.
        for module in self.compiled_modules():
            uncompile(module)

    def configure_optimizers(self) -> dict[str, Any]:
        recipe = self.recipe
        lr = effective_lr(recipe, self.trainer.world_size if self._trainer else 1)
        groups = build_param_groups(self.optimised_module(), recipe.optim, lr)
        optimizer = build_optimizer(groups, recipe.optim, lr)
        total = int(self.trainer.estimated_stepping_batches)
        schedule = recipe.schedule
        if schedule.warmup_steps is not None:
            warmup = schedule.warmup_steps
        else:
            warmup = round(schedule.warmup_epochs * optimizer_steps_per_epoch(self.trainer, total))
        scheduler = LambdaLR(
            optimizer, lr_multiplier(schedule.name, total, warmup, schedule.min_lr_ratio)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"},
        }
