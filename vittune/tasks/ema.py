"""An exponential moving average of the trained model (DeiT, timm's train.py), `ema:` recipe.

timm's `ModelEmaV3` keeps the average of `task.model` only: never a distillation teacher or an
MAE decoder. It is a child module of the task (`task.ema`), so Lightning moves it with the
task and checkpoints hold it (`ema.module.*`): a resume continues the same average. Lightning's
`EMAWeightAveraging` would average the whole LightningModule (the teacher too) and swaps the
average into the checkpoint's weights, which hides the raw ones that resume needs.

`EmaUpdate` updates the average once per optimiser step (after gradient accumulation): before
`start_epoch` it copies the weights, from then on every `every_n_steps` steps it moves them by
`1 - decay`. The task scores the average as `val/*` and the raw weights as `val_raw/*`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch import nn

from vittune.recipe.schema import EmaConfig


def build_ema(model: nn.Module, cfg: EmaConfig) -> nn.Module:
    """timm's ModelEmaV3 over `model` (a copy of its weights, without gradients)."""
    from timm.utils import ModelEmaV3  # noqa: PLC0415

    ema = ModelEmaV3(model, decay=cfg.decay)
    for param in ema.parameters():
        param.requires_grad_(False)
    # Lightning sets train/eval on the whole task (and warns about children left in eval);
    # the average is only ever run under validation's eval().
    return ema.train(model.training)


class EmaUpdate(L.Callback):
    """Moves `pl_module.ema` towards `pl_module.model` after optimiser steps."""

    def __init__(self, cfg: EmaConfig) -> None:
        self.cfg = cfg
        self.last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run's average already includes the checkpoint's step.
        self.last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        step = trainer.global_step
        if step == self.last_step:  # accumulating: no optimiser step since the last batch
            return
        self.last_step = step
        if trainer.current_epoch < self.cfg.start_epoch:
            pl_module.ema.set(pl_module.model)
        elif step % self.cfg.every_n_steps == 0:
            pl_module.ema.update(pl_module.model)
