"""From a validated recipe to a finished run: build (task, datamodule, trainer), fit, export.

Data flows one way: recipe -> data, models, optim -> task -> Trainer. Nothing here knows
about the command line.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)

from vittune.assembly import Assembly, build
from vittune.errors import RecipeError, VittuneError
from vittune.export import export_config, write_export
from vittune.models.weights import read_state_dict
from vittune.recipe.load import dump_recipe
from vittune.recipe.schema import Command, Recipe
from vittune.tasks.base import VitTask
from vittune.tracking import build_loggers

RUN_DIR_ENV = "VITTUNE_RUN_DIR"  # shared with DDP worker processes, which re-run the CLI


@dataclass
class RunResult:
    run_dir: Path
    monitor: str
    best_score: float | None
    export_path: Path | None
    messages: list[str] = field(default_factory=list)


def default_precision(accelerator: str) -> str:
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    # Native bf16 only (Ampere and newer): emulated bf16 on V100/T4 is slower than fp32.
    native_bf16 = on_gpu and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if native_bf16 else "32-true"


def build_trainer(
    recipe: Recipe, run_dir: Path, monitor: tuple[str, str], extra: list[Callback]
) -> tuple[L.Trainer, ModelCheckpoint, str | None]:
    t = recipe.trainer
    name = run_dir.name
    loggers, wandb_message = build_loggers(recipe.logging, run_dir, name)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor[0],
        mode=monitor[1],
        save_top_k=recipe.checkpoint.save_top_k,
        save_last=True,
        auto_insert_metric_name=False,
    )
    callbacks: list[Callback] = [checkpoint, LearningRateMonitor(logging_interval="step"), *extra]
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
        num_sanity_val_steps=0,
        **{k: v for k, v in optional.items() if v is not None},
    )
    return trainer, checkpoint, wandb_message


def launched_rank() -> int:
    """This process's global rank when an external launcher (torchrun, SLURM, MPI) started it."""
    for key in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "NODE_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def prepare_run_dir(recipe: Recipe, recipe_path: str | Path) -> tuple[Path, bool]:
    """(folder, created): a fresh `runs/<name>` (never overwriting one), shared with DDP workers."""
    if os.environ.get(RUN_DIR_ENV):
        return Path(os.environ[RUN_DIR_ENV]), False
    name = recipe.logging.name or f"{Path(recipe_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    base = Path(recipe.logging.run_dir)
    if launched_rank() > 0:  # torchrun / SLURM / other nodes: only rank 0 creates the folder
        return base / name, False
    candidate, suffix = base / name, 1
    while candidate.exists():
        suffix += 1
        candidate = base / f"{name}-{suffix}"
    candidate.mkdir(parents=True)
    os.environ[RUN_DIR_ENV] = str(candidate)
    return candidate, True


def monitor_of(recipe: Recipe, task: VitTask) -> tuple[str, str]:
    metric = recipe.checkpoint.monitor or task.default_monitor[0]
    mode = recipe.checkpoint.mode or (
        task.default_monitor[1]
        if metric == task.default_monitor[0]
        else ("min" if "loss" in metric else "max")
    )
    return metric, mode


def export_best(
    assembly: Assembly, recipe: Recipe, command: Command, checkpoint: ModelCheckpoint, run_dir: Path
) -> Path:
    """Write the best (else last) weights of the exported module in timm key names."""
    module = assembly.export_module(assembly.task)
    best = checkpoint.best_model_path or checkpoint.last_model_path
    state = read_state_dict(Path(best)) if best else module.state_dict()
    own = set(module.state_dict())
    state = {k: v for k, v in state.items() if k in own}
    config = export_config(
        recipe.model.name,
        module,
        assembly.classes,
        recipe.model.img_size,
        recipe.model.in_chans,
        assembly.mean,
        assembly.std,
        dict(recipe.model.kwargs),
        command,
    )
    return write_export(state, config, run_dir, assembly.export_name)


def fit(
    recipe: Recipe, command: Command, recipe_path: str | Path, log: Callable[[str], None] = print
) -> RunResult:
    """Train as the recipe says, keep best/last checkpoints, and export the best weights."""
    resume = recipe.trainer.resume_from
    if resume is not None and not Path(resume).is_file():
        raise RecipeError(
            f"trainer.resume_from {resume} is not a checkpoint file; point it at runs/<name>/checkpoints/last.ckpt"
        )
    run_dir, created = prepare_run_dir(recipe, recipe_path)
    try:
        return _fit_into(run_dir, created, recipe, command, log)
    finally:
        if created:  # a later fit() in this process (a notebook) gets its own folder
            os.environ.pop(RUN_DIR_ENV, None)


def _fit_into(
    run_dir: Path, created: bool, recipe: Recipe, command: Command, log: Callable[[str], None]
) -> RunResult:
    if created:
        (run_dir / "recipe.yaml").write_text(dump_recipe(recipe))
    L.seed_everything(recipe.trainer.seed, workers=True, verbose=False)
    try:
        assembly = build(recipe, command, run_dir)
    except VittuneError:
        if created:  # nothing was trained: leave no half-made folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    monitor = monitor_of(recipe, assembly.task)
    trainer, checkpoint, wandb_message = build_trainer(recipe, run_dir, monitor, assembly.callbacks)
    if trainer.is_global_zero:
        log(f"vittune {command}: run folder {run_dir}")
        log(
            f"  weights: {assembly.report.source}"
            + "".join(f"\n  {n}" for n in assembly.report.notes)
        )
        sizes = {s: len(v) for s, v in assembly.datamodule.found.splits.items()}
        log(f"  data: {len(assembly.classes)} classes, images per split {sizes}")
        if wandb_message:
            log(f"  {wandb_message}")
    trainer.fit(
        assembly.task,
        datamodule=assembly.datamodule,
        ckpt_path=recipe.trainer.resume_from,
        weights_only=True,  # checkpoints hold tensors and plain data only
    )
    if trainer.is_global_zero and (corrupt := assembly.datamodule.corrupt_report()):
        log(corrupt)
    result = RunResult(run_dir, monitor[0], None, None, [m for m in [wandb_message] if m])
    score = checkpoint.best_model_score
    result.best_score = float(score) if score is not None else None
    if trainer.is_global_zero:
        result.export_path = export_best(assembly, recipe, command, checkpoint, run_dir)
    return result
