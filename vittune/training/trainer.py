"""The Lightning Trainer a run gets: loggers, checkpoint callbacks, precision, early stopping.

Everything the recipe's `trainer:`, `checkpoint:` and `logging:` sections decide about the
Trainer is here; the run itself (folder, resume, fit, export) is run.py's.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, EarlyStopping, LearningRateMonitor

from vittune.recipe.schema import Recipe
from vittune.tasks.base import VitTask
from vittune.training.checkpointing import (
    AtomicCheckpointIO,
    BestCheckpoint,
    LatestCheckpoint,
    best_filename,
)
from vittune.training.console import console_callbacks
from vittune.training.tracking import build_loggers


def default_precision(accelerator: str) -> str:
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    # Native bf16 only (Ampere and newer): emulated bf16 on V100/T4 is slower than fp32.
    native_bf16 = on_gpu and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if native_bf16 else "32-true"


def build_trainer(
    recipe: Recipe,
    run_dir: Path,
    monitor: tuple[str, str],
    extra: list[Callback],
    start_step: int = 0,
    wandb_id: str | None = None,
) -> tuple[L.Trainer, BestCheckpoint, str | None]:
    t = recipe.trainer
    name = run_dir.name
    loggers, wandb_message = build_loggers(recipe.logging, run_dir, name, wandb_id)
    checkpoint = BestCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename=best_filename(monitor[0], recipe.checkpoint.save_top_k),
        monitor=monitor[0],
        mode=monitor[1],
        save_top_k=recipe.checkpoint.save_top_k,
        save_last=False,  # LatestCheckpoint keeps last.ckpt, at every epoch and on a stop
        auto_insert_metric_name=False,
    )
    latest = LatestCheckpoint(
        run_dir / "checkpoints", recipe.checkpoint.every_n_steps, start_step, best=checkpoint
    )
    callbacks: list[Callback] = [
        checkpoint,
        LearningRateMonitor(logging_interval="step"),
        *console_callbacks(),  # the progress display: a bar on a terminal, epoch lines in a file
        *extra,
    ]
    if t.early_stopping_patience:
        # Checked after each validation, not at the end of a training epoch: a run capped by
        # `max_steps` mid-epoch ends an epoch that had no validation, and the metric is missing.
        callbacks.append(
            EarlyStopping(
                monitor=monitor[0],
                mode=monitor[1],
                patience=t.early_stopping_patience,
                check_on_train_epoch_end=False,
            )
        )
    callbacks.append(latest)  # after the best checkpoint: last.ckpt holds its updated score
    optional = {
        "limit_train_batches": t.limit_train_batches,
        "limit_val_batches": t.limit_val_batches,
    }
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=t.strategy,
        precision=t.precision or default_precision(t.accelerator),
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        accumulate_grad_batches=t.accumulate_grad_batches,
        gradient_clip_val=t.gradient_clip_val,
        deterministic=t.deterministic,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        log_every_n_steps=t.log_every_n_steps,
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        num_sanity_val_steps=0,
        **{k: v for k, v in optional.items() if v is not None},
    )
    return trainer, checkpoint, wandb_message


def monitor_of(recipe: Recipe, task: VitTask) -> tuple[str, str]:
    metric = recipe.checkpoint.monitor or task.default_monitor[0]
    mode = recipe.checkpoint.mode or (
        task.default_monitor[1]
        if metric == task.default_monitor[0]
        else ("min" if "loss" in metric else "max")
    )
    return metric, mode
